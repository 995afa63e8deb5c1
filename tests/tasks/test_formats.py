"""Downstream loaders on tiny files written in each real dataset's format, answer normalisation,
the VQA metric on hand-computed cases, and clear errors for malformed files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maskvlm.data.formats import DataError
from maskvlm.tasks import nlvr2, ve, vqa
from maskvlm.tasks.classify import Example
from maskvlm.tasks.downstream import CLASSIFICATION_TASKS


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- VQA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("  Red. ", "red"), ("the red one", "red 1"), ("A Circle", "circle"), ("yes!", "yes"),
    ("1,000", "1000"), ("2.5", "2.5"), ("black/white", "black white"), ("dont know", "don't know"),
    ("no, it isnt", "no it isn't"), ("None", "0"), ("hot-dog", "hot dog"), ("left.", "left"),
    # the evaluator's rules, case by case: a period is kept only before a digit ("2." was kept)
    ("2.", "2"), ("3. ", "3"), (".5", ".5"), ("u.s.", "us"),
    # a mark next to a space anywhere drops that mark everywhere; a "1,000" drops every mark
    ("red / blue and black/white", "red blue and blackwhite"), ("1,000 red-ish", "1000 redish"),
    # symbols outside the evaluator's list stay ("$5" became "5")
    ("$5", "$5"), ("50%", "50%"), ("a*", "a*"),
    # words that look like contractions without their apostrophe but are not in its table stay
    # ("shell" became "she'll", "ill" "i'll", "well" "we'll"); forms with two apostrophes are found
    # with one of them left out
    ("shell", "shell"), ("ill", "ill"), ("well", "well"), ("were", "were"), ("hell", "hell"), ("id", "id"),
    ("lets", "lets"), ("im", "im"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("couldntve", "couldntve"), ("y'alld've", "y'all'd've"), ("twas", "'twas"), ("somebody'd", "somebodyd"),
])
def test_answer_normalisation(raw, expected):
    assert vqa.normalize_answer(raw) == expected


def test_vqa_accuracy_hand_computed():
    # 3 of 10 annotators said "2" (one as "two"): each of them sees 2 others -> 2/3, the other 7 see 3 -> 1
    answers = ["2", "2", "two"] + ["3"] * 7
    assert vqa.vqa_accuracy("2", answers) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa.vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa.vqa_accuracy("2", ["2", "2"] + ["x"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa.vqa_accuracy("4", answers) == 0.0


def _evaluator_accuracy(predicted, answers):
    """The official evaluator's procedure: whitespace cleaned on both sides; answers and prediction
    normalised only when the ten answers are not all one string; each answer left out in turn."""
    def clean(text):
        return text.replace("\n", " ").replace("\t", " ").strip()
    gts, res = [clean(a) for a in answers], clean(predicted)
    if len(set(gts)) > 1:
        gts, res = [vqa.normalize_answer(g) for g in gts], vqa.normalize_answer(res)
    return sum(min(1.0, sum(g == res for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)


def test_vqa_accuracy_agrees_with_the_evaluator_on_answers_in_normal_form():
    """The official annotation files hold answers in normal form, and predictions come from the
    (normalised) answer vocabulary: there the two agree, answer lists all alike included."""
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    forms = sorted({vqa.normalize_answer(a) for a in ["yes", "no", "2", "10", "red", "black and white", "don't know",
                                                      "2.5", "shell", "ill", "1000", "left", "top right"]})
    ten = st.lists(st.sampled_from(forms), min_size=10, max_size=10)

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(ten | st.sampled_from(forms).map(lambda a: [a] * 10), st.sampled_from(forms))
    def agree(answers, predicted):
        assert vqa.vqa_accuracy(predicted, answers) == pytest.approx(_evaluator_accuracy(predicted, answers))

    agree()
    # the one documented difference: ten answers alike but not in normal form
    assert vqa.vqa_accuracy("yes", ["Yes"] * 10) == 1.0 and _evaluator_accuracy("yes", ["Yes"] * 10) == 0.0


def test_answer_vocabulary_and_soft_scores():
    exs = [Example(1, [], "q", answers=["Red", "red", "red.", "blue"]),
           Example(2, [], "q", answers=["blue", "Blue", "green", "two"])]
    vocab = vqa.build_answer_vocab(exs, top_n=3)
    assert vocab == ["blue", "red", "2"]  # counts 3, 3 (alphabetical), then 1s alphabetical: "2" < "green"
    index = {a: i for i, a in enumerate(vocab)}
    assert vqa.soft_scores(exs[0].answers, index) == {1: 1.0, 0: pytest.approx(1 / 3)}
    assert vqa.attach_targets(exs, ["red"]) == 1  # the second question has no answer in this vocabulary


def _official_vqa(tmp_path, subtype="val2014", with_answers=True):
    questions = [{"image_id": 42, "question": "What color is it?", "question_id": 4201},
                 {"image_id": 7, "question": "How many?", "question_id": 701}]
    (tmp_path / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps(
        {"data_subtype": subtype, "task_type": "Open-Ended", "questions": questions}))
    if with_answers:
        annotations = [{"question_id": 4201, "image_id": 42, "answer_type": "other", "question_type": "what color is",
                        "answers": [{"answer": "red", "answer_id": i} for i in range(10)]},
                       {"question_id": 701, "image_id": 7, "answer_type": "number", "question_type": "how many",
                        "answers": [{"answer": "two", "answer_id": i} for i in range(10)]}]
        (tmp_path / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps(
            {"data_subtype": subtype, "annotations": annotations}))
    for image_id in (42, 7):
        folder = subtype.replace("test-dev", "test")
        _image(tmp_path / folder / f"COCO_{folder}_{image_id:012d}.jpg")
    return tmp_path / f"v2_OpenEnded_mscoco_{subtype}_questions.json"


def test_vqa_official_files(tmp_path):
    exs = vqa.load_vqa(_official_vqa(tmp_path))
    assert [e.id for e in exs] == [4201, 701]
    assert exs[0].images[0] == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert exs[1].answers == ["two"] * 10 and exs[1].kind == "number"
    m = vqa.vqa_metrics(["Red", "3"], exs)
    assert m["vqa_acc"] == 50.0 and m["vqa_acc_other"] == 100.0 and m["vqa_acc_number"] == 0.0
    assert [e.question_type for e in exs] == ["what color is", "how many"]


def test_vqa_accuracy_by_question_type_hand_computed():
    def ex(qtype, *answers):
        return Example(id=0, images=[], text="?", answers=list(answers), question_type=qtype)

    examples = [ex("how many", *["2"] * 10), ex("how many", *["3"] * 2, *["4"] * 8), ex("is the", *["yes"] * 10),
                ex("", *["no"] * 10),  # no type: counted overall, not in the table
                Example(id=1, images=[], text="?", question_type="is the")]  # no answers: not scored
    rows = vqa.accuracy_by_question_type(["2", "3", "no", "no", "yes"], examples)
    # "3" is one of 10 answers twice: min(2 / 3, 1) averaged over the 10 leave-one-out subsets = 0.6
    assert rows == [{"question_type": "how many", "count": 2, "vqa_acc": pytest.approx(80.0)},
                    {"question_type": "is the", "count": 1, "vqa_acc": 0.0}]
    table = vqa.format_question_types(rows)
    assert "2 types" in table and table.splitlines()[2].split() == ["how", "many", "2", "80.00"]
    assert "no question types" in vqa.format_question_types([])


def test_vqa_test_dev_without_answers_uses_test_images_and_writes_results(tmp_path):
    exs = vqa.load_vqa(_official_vqa(tmp_path, "test-dev2015", with_answers=False))
    assert exs[0].answers is None and exs[0].images[0].name == "COCO_test2015_000000000042.jpg"
    assert vqa.vqa_metrics(["a", "b"], exs) == {}
    vqa.write_results(tmp_path / "r.json", ["red", "2"], exs)
    assert json.loads((tmp_path / "r.json").read_text()) == [{"question_id": 4201, "answer": "red"},
                                                             {"question_id": 701, "answer": "2"}]


def test_vqa_albef_list(tmp_path):
    _image(tmp_path / "train2014" / "a.jpg")
    path = tmp_path / "vqa_train.json"
    path.write_text(json.dumps([{"question_id": 1, "question": "is it?", "image": "train2014/a.jpg",
                                 "answer": ["yes", "yes", "no"], "dataset": "vqa"}]))
    (ex,) = vqa.load_vqa(path)
    assert ex.answers == ["yes", "yes", "no"] and ex.images[0] == tmp_path / "train2014" / "a.jpg"
    assert ex.question_type == ""
    path.write_text(json.dumps([{"question_id": 1, "question": "is it?", "image": "train2014/a.jpg",
                                 "answer": "yes", "question_type": "is it"}]))
    assert vqa.load_vqa(path)[0].question_type == "is it"


def test_vqa_malformed_files_name_file_entry_and_field(tmp_path):
    path = _official_vqa(tmp_path)
    data = json.loads(path.read_text())
    data["questions"][1]["image_id"] = "seven"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"questions\.json: question 1 \(question_id 701\): field 'image_id' must be int"):
        vqa.load_vqa(path)
    del data["questions"][1]["image_id"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"field 'image_id' must be int \(missing\)"):
        vqa.load_vqa(path)
    data["questions"][1].update(image_id=7, question="  ")
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"question 1 \(question_id 701\): field 'question' is empty"):
        vqa.load_vqa(path)
    path = _official_vqa(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000007.jpg").unlink()
    with pytest.raises(DataError, match=r"question_id 701: image file not found: .*COCO_val2014_000000000007.jpg"):
        vqa.load_vqa(path)
    ann = tmp_path / "v2_mscoco_val2014_annotations.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["answers"] = "red"
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\.json: annotation 0 \(question_id 4201\): field 'answers'"):
        vqa.load_vqa(path, check=False)
    data["annotations"][0].update(answers=[{"answer": "red"}], question_type=["what", "color"])
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotation 0 \(question_id 4201\): field 'question_type' must be str"):
        vqa.load_vqa(path, check=False)


# --- NLVR2 ---------------------------------------------------------------------------------------
def test_nlvr2_pairs_from_identifiers(tmp_path):
    for name in ("train-10171-0-img0.png", "train-10171-0-img1.png"):
        _image(tmp_path / "train" / "21" / name)
    for name in ("dev-5-2-img0.png", "dev-5-2-img1.png"):
        _image(tmp_path / "dev" / name)
    _jsonl(tmp_path / "train.json", [
        {"identifier": "train-10171-0-0", "sentence": "One image has a dog.", "label": "True", "directory": "21"},
        {"identifier": "train-10171-0-1", "sentence": "No dogs.", "label": "False", "directory": 21}])
    _jsonl(tmp_path / "dev.json", [{"identifier": "dev-5-2-3", "sentence": "s", "label": "False"}])
    train = nlvr2.load_nlvr2(tmp_path / "train.json")
    assert [e.label for e in train] == [1, 0]
    assert train[0].images == [tmp_path / "train/21/train-10171-0-img0.png", tmp_path / "train/21/train-10171-0-img1.png"]
    dev = nlvr2.load_nlvr2(tmp_path / "dev.json")
    assert dev[0].images[1] == tmp_path / "dev" / "dev-5-2-img1.png" and dev[0].label == 0
    # a flat image folder given as the image root also works
    flat = nlvr2.load_nlvr2(tmp_path / "dev.json", image_root=str(tmp_path / "dev"))
    assert flat[0].images[0] == tmp_path / "dev" / "dev-5-2-img0.png"


def test_nlvr2_consistency_and_the_official_csv(tmp_path):
    # statement 850/1 was written for pairs 0 and 2, statement 850/0 for pair 1, 851/0 for pair 0
    ids = ["dev-850-0-1", "dev-850-2-1", "dev-850-1-0", "dev-851-0-0"]
    examples = [Example(i, [], "s", label=1) for i in ids]
    spec = CLASSIFICATION_TASKS["nlvr2"]
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # the second is wrong
    metrics, names = spec.score(logits, examples, list(spec.classes))
    assert metrics["acc"] == pytest.approx(75.0)
    assert metrics["consistency"] == pytest.approx(200 / 3)  # 850/1 has one wrong pair; the other two are right
    assert nlvr2.consistency([True] * 4, examples) == 100.0
    spec.write_predictions(tmp_path / "p.csv", names, examples)
    assert (tmp_path / "p.csv").read_text().splitlines() == [
        "dev-850-0-1,True", "dev-850-2-1,False", "dev-850-1-0,True", "dev-851-0-0,True"]
    spec.write_predictions(tmp_path / "p.json", names, examples)
    assert json.loads((tmp_path / "p.json").read_text())[1] == {"id": "dev-850-2-1", "prediction": "False",
                                                                  "label": "True"}


def test_an_evaluation_file_is_labelled_in_full_or_not_at_all(tmp_path):
    """A file where some entries have labels and others not was scored over the labelled ones alone."""
    for name in ("dev-5-2-img0.png", "dev-5-2-img1.png", "dev-6-0-img0.png", "dev-6-0-img1.png"):
        _image(tmp_path / "dev" / name)
    _jsonl(tmp_path / "dev.json", [{"identifier": "dev-5-2-0", "sentence": "s", "label": "True"},
                                   {"identifier": "dev-6-0-0", "sentence": "s"}])
    with pytest.raises(DataError, match=r"dev\.json: line 2 \(dev-6-0-0\) has no 'label' while 1 have one\. "
                                        r"Figures over the labelled entries alone"):
        nlvr2.load_nlvr2(tmp_path / "dev.json")
    _jsonl(tmp_path / "dev.json", [{"identifier": "dev-5-2-0", "sentence": "s"},
                                   {"identifier": "dev-6-0-0", "sentence": "s"}])
    assert [e.label for e in nlvr2.load_nlvr2(tmp_path / "dev.json")] == [None, None]  # a test-U file: predictions only
    _image(tmp_path / "1.jpg")
    _jsonl(tmp_path / "ve.jsonl", [{"Flickr30K_ID": "1", "sentence2": "h", "gold_label": "neutral"},
                                   {"Flickr30K_ID": "1", "sentence2": "h", "gold_label": "-"},
                                   {"Flickr30K_ID": "1", "sentence2": "h"}, {"Flickr30K_ID": "1", "sentence2": "h"}])
    with pytest.raises(DataError, match=r"ve\.jsonl: line 3 has no 'gold_label', nor do 1 more entries, while 1 have"):
        ve.load_snli_ve(tmp_path / "ve.jsonl")
    (tmp_path / "q.json").write_text(json.dumps([{"question_id": 1, "question": "q?", "image": "1.jpg", "answer": "a"},
                                                 {"question_id": 2, "question": "q?", "image": "1.jpg"}]))
    with pytest.raises(DataError, match=r"q\.json: entry 1 \(question_id 2\) has no 'answer' while 1 have one"):
        vqa.load_vqa(tmp_path / "q.json")
    (tmp_path / "q.json").write_text(json.dumps([{"question_id": 1, "question": "q?", "image": "1.jpg", "answer": []}]))
    with pytest.raises(DataError, match=r"entry 0 \(question_id 1\): field 'answer' is an empty list"):
        vqa.load_vqa(tmp_path / "q.json")


def test_nlvr2_malformed(tmp_path):
    _jsonl(tmp_path / "dev.json", [{"identifier": "dev-5-2-3", "sentence": "s", "label": "maybe"}])
    with pytest.raises(DataError, match=r"dev\.json: line 1 \(dev-5-2-3\): field 'label' must be \"True\" or \"False\""):
        nlvr2.load_nlvr2(tmp_path / "dev.json", check=False)
    _jsonl(tmp_path / "dev.json", [{"identifier": "dev-5-2-3", "label": "True"}])
    with pytest.raises(DataError, match=r"line 1 \(dev-5-2-3\): field 'sentence' must be str \(missing\)"):
        nlvr2.load_nlvr2(tmp_path / "dev.json")
    _jsonl(tmp_path / "dev.json", [{"identifier": "dev-5-2-3", "sentence": " ", "label": "True"}])
    with pytest.raises(DataError, match=r"line 1 \(dev-5-2-3\): field 'sentence' is empty"):  # was read as a statement
        nlvr2.load_nlvr2(tmp_path / "dev.json", check=False)
    _jsonl(tmp_path / "dev.json", [{"identifier": "dev-5-2-3", "sentence": "s", "label": "True"}])
    with pytest.raises(DataError, match=r"dev\.json: dev-5-2-3: image file not found: .*dev-5-2-img0\.png"):
        nlvr2.load_nlvr2(tmp_path / "dev.json")
    (tmp_path / "bad.json").write_text('{"identifier": "x"\n')
    with pytest.raises(DataError, match=r"bad\.json: line 1 is not valid JSON"):
        nlvr2.load_nlvr2(tmp_path / "bad.json")


# --- SNLI-VE --------------------------------------------------------------------------------------
def test_snli_ve_labels_and_images(tmp_path):
    _image(tmp_path / "flickr30k_images" / "1000092795.jpg")
    rows = [{"Flickr30K_ID": "1000092795", "sentence2": h, "gold_label": g, "pairID": f"p{i}"}
            for i, (h, g) in enumerate([("a", "entailment"), ("b", "neutral"), ("c", "contradiction"), ("d", "-")])]
    _jsonl(tmp_path / "snli_ve_dev.jsonl", rows)
    exs = ve.load_snli_ve(tmp_path / "snli_ve_dev.jsonl")
    assert [e.label for e in exs] == [0, 1, 2]  # "-" (no majority) skipped
    assert [ve.CLASSES[e.label] for e in exs] == ["entailment", "neutral", "contradiction"]
    assert exs[0].images[0] == tmp_path / "flickr30k_images" / "1000092795.jpg" and exs[0].id == "p0"


def test_snli_ve_malformed(tmp_path):
    _jsonl(tmp_path / "snli_ve_dev.jsonl", [{"Flickr30K_ID": "1", "sentence2": "a", "gold_label": "maybe"}])
    with pytest.raises(DataError, match=r"snli_ve_dev\.jsonl: line 1: field 'gold_label' must be one of"):
        ve.load_snli_ve(tmp_path / "snli_ve_dev.jsonl")
    _jsonl(tmp_path / "snli_ve_dev.jsonl", [{"Flickr30K_ID": "1", "sentence2": 3, "gold_label": "neutral"}])
    with pytest.raises(DataError, match=r"line 1: field 'sentence2' must be str \(got int 3\)"):
        ve.load_snli_ve(tmp_path / "snli_ve_dev.jsonl")
    _jsonl(tmp_path / "snli_ve_dev.jsonl", [{"Flickr30K_ID": "1", "sentence2": "", "gold_label": "neutral"}])
    with pytest.raises(DataError, match=r"line 1: field 'sentence2' is empty"):
        ve.load_snli_ve(tmp_path / "snli_ve_dev.jsonl")
    _jsonl(tmp_path / "snli_ve_dev.jsonl", [{"Flickr30K_ID": "1", "sentence2": "a", "gold_label": "neutral"}])
    with pytest.raises(DataError, match=r"image file not found: .*1\.jpg"):
        ve.load_snli_ve(tmp_path / "snli_ve_dev.jsonl")
    # the line in the file, blank lines counted (it was the entry's number: "line 2" here)
    (tmp_path / "snli_ve_dev.jsonl").write_text('{"Flickr30K_ID": "1", "sentence2": "a", "gold_label": "neutral"}\n\n'
                                                '{"Flickr30K_ID": "1", "sentence2": "a", "gold_label": "maybe"}\n')
    with pytest.raises(DataError, match=r"snli_ve_dev\.jsonl: line 3: field 'gold_label'"):
        ve.load_snli_ve(tmp_path / "snli_ve_dev.jsonl", check=False)
