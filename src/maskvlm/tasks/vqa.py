"""VQA v2: loaders for the official question/annotation files and the ALBEF-style JSON list,
the standard answer normalisation, the answer vocabulary (top-N training answers), soft
scores min(#annotators / 3, 1), the official accuracy and the eval-server result file."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Optional

from ..data.formats import DataError, check_images, check_labels_all_or_none, read_json, require
from .classify import Example

# --- answer normalisation ----------------------------------------------------------------------
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# Contractions written without an apostrophe, mapped back to the usual spelling: the evaluator's
# table. A form with one apostrophe is found without it ("dont"); a form with two or more is found
# with any one of them left out ("couldnt've", "couldn'tve"), not with all. Words such as "ill",
# "well", "were", "shell", "hell", "id" and "lets" are not in it and stay as written.
_CONTRACTED_FORMS = (
    "'ow's'at 'twas ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't "
    "wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've").split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for form in _CONTRACTED_FORMS:
        cuts = [i for i, ch in enumerate(form) if ch == "'"]
        if len(cuts) == 1:
            table[form.replace("'", "")] = form
        else:
            table.update((form[:i] + form[i + 1:], form) for i in cuts)
    # The one entry that goes the other way. (The table's entries with a capital I, such as "Im",
    # never match: answers are lower-cased before the lookup.)
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()
# The evaluator's punctuation marks. A mark is dropped where the text has it next to a space, and
# stands for a space elsewhere ("black/white" -> "black white"); the test is on the whole answer,
# so one "/ " drops every "/" in it. An answer holding a number with a thousands comma ("1,000")
# has every mark dropped. Apostrophes, colons, periods and other symbols ($, %, *) are not in it.
_PUNCT = tuple(";/[]\"{}()=+\\_-><@`,?!")
_NUMBER_COMMA = re.compile(r"\d,\d")
# A period is dropped unless a digit follows it: "2.5" and ".5" keep theirs, "2." and "u.s." do not.
_PERIOD = re.compile(r"\.(?!\d)")
# The evaluator passes re.UNICODE (32) where re.sub takes its count, so it drops at most 32 periods.
_PERIOD_COUNT = 32


def _process_punctuation(text: str) -> str:
    drop_all = _NUMBER_COMMA.search(text) is not None
    out = text
    for mark in _PUNCT:
        if mark in text:
            drop = drop_all or (mark + " ") in text or (" " + mark) in text
            out = out.replace(mark, "" if drop else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation, rule for rule: whitespace, punctuation (see
    ``_PUNCT``; "1,000" -> "1000", "2." -> "2", "2.5" kept), lower case, number words -> digits,
    articles dropped, apostrophe-less contractions restored ("dont" -> "don't")."""
    text = _process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(predicted: str, answers: list[str]) -> float:
    """Official VQA accuracy of one prediction: the mean, over the 10 leave-one-annotator-out
    subsets, of min(1, #annotators in the subset who gave the prediction / 3).

    The prediction and every annotator's answer are normalised (``normalize_answer``). The
    evaluator does the same whenever the answers are not all one string; when they are, it compares
    them as written (whitespace stripped) with the prediction as written. The two agree on the
    official annotation files, whose answers are written in normal form; on answers that are not
    ("Yes" ten times) this function counts "yes" as right, where the evaluator would not."""
    pred = normalize_answer(predicted)
    gts = [normalize_answer(a) for a in answers]
    matches = [g == pred for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def build_answer_vocab(examples: list[Example], top_n: int = 3129) -> list[str]:
    """The ``top_n`` most frequent normalised training answers (ties: alphabetical)."""
    counts: Counter = Counter()
    for ex in examples:
        counts.update(normalize_answer(a) for a in ex.answers or [])
    counts.pop("", None)
    if not counts:
        raise DataError("no answers in the VQA training data: cannot build an answer vocabulary")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:top_n]]


def soft_scores(answers: list[str], index: dict[str, int]) -> dict[int, float]:
    """answer index -> min(#annotators who gave it / 3, 1), for answers in the vocabulary."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {index[a]: min(1.0, n / 3.0) for a, n in counts.items() if a in index}


def attach_targets(examples: list[Example], vocab: list[str]) -> int:
    """Fill ``soft`` from the vocabulary; returns how many examples have no answer in it."""
    index = {a: i for i, a in enumerate(vocab)}
    uncovered = 0
    for ex in examples:
        ex.soft = soft_scores(ex.answers or [], index)
        uncovered += not ex.soft
    return uncovered


# --- loaders -------------------------------------------------------------------------------------
_SUBTYPE = re.compile(r"((?:train|val|test-dev|test)\d{4})")


def annotation_path_for(questions_path: Path, subtype: str) -> Path:
    """Where the official annotations of a questions file live: ``v2_mscoco_{subtype}_annotations.json``."""
    return questions_path.parent / f"v2_mscoco_{subtype}_annotations.json"


def load_vqa(path: str | Path, image_root: Optional[str] = None, check: bool = True) -> list[Example]:
    """Questions from the official ``v2_OpenEnded_mscoco_{subtype}_questions.json`` (answers from the
    ``v2_mscoco_{subtype}_annotations.json`` next to it, when present) or from an ALBEF-style list
    ``[{"question_id", "question", "image", "answer": [..]}]``. Images of the official layout are
    ``{image_root}/{subtype}/COCO_{subtype}_{image_id:012d}.jpg`` (test-dev uses the test images);
    ``image_root`` defaults to the file's folder."""
    path = Path(path)
    data = read_json(path)
    root = Path(image_root) if image_root else path.parent
    if isinstance(data, dict) and "questions" in data:
        examples = _load_official(path, data, root)
    elif isinstance(data, list):
        examples = _load_list(path, data, root)
    else:
        raise DataError(f"{path}: expected the official VQA questions file (an object with 'questions') or a "
                        "JSON list of {question_id, question, image, answer} entries")
    if not examples:
        raise DataError(f"{path}: no questions")
    if check:
        check_images([p for ex in examples for p in ex.images],
                     [f"{path}: question_id {ex.id}" for ex in examples])
    return examples


def _load_official(path: Path, data: dict, root: Path) -> list[Example]:
    subtype = data.get("data_subtype")
    if not isinstance(subtype, str):
        m = _SUBTYPE.search(path.name)
        if not m:
            raise DataError(f"{path}: field 'data_subtype' is missing and the file name names no split "
                            "(expected e.g. train2014)")
        subtype = m.group(1)
    image_dir = subtype.replace("test-dev", "test")
    questions = data["questions"]
    if not isinstance(questions, list):
        raise DataError(f"{path}: field 'questions' must be a list")
    answers: dict[int, dict] = {}
    ann_path = annotation_path_for(path, subtype)
    if ann_path.is_file():
        ann = read_json(ann_path)
        items = ann.get("annotations") if isinstance(ann, dict) else None
        if not isinstance(items, list):
            raise DataError(f"{ann_path}: expected an object with a list 'annotations'")
        for i, a in enumerate(items):
            where = f"{ann_path}: annotation {i}"
            qid = require(a, "question_id", int, where)
            where = f"{where} (question_id {qid})"
            raw = require(a, "answers", list, where)
            texts = [require(x, "answer", str, f"{where} answers[{j}]") for j, x in enumerate(raw)]
            answers[qid] = dict(answers=texts, kind=require(a, "answer_type", str, where, default=""),
                                qtype=require(a, "question_type", str, where, default=""))
    examples = []
    for i, q in enumerate(questions):
        where = f"{path}: question {i}"
        qid = require(q, "question_id", int, where)
        where = f"{where} (question_id {qid})"
        image_id = require(q, "image_id", int, where)
        text = require(q, "question", str, where, text=True)
        a = answers.get(qid)
        if answers and a is None:
            raise DataError(f"{where}: no annotation for this question in {ann_path}")
        examples.append(Example(id=qid, images=[root / image_dir / f"COCO_{image_dir}_{image_id:012d}.jpg"],
                                text=text, answers=a["answers"] if a else None, kind=a["kind"] if a else "",
                                question_type=a["qtype"] if a else ""))
    return examples


def _load_list(path: Path, data: list, root: Path) -> list[Example]:
    examples, unanswered = [], []
    for i, e in enumerate(data):
        where = f"{path}: entry {i}"
        qid = require(e, "question_id", (int, str), where)
        where = f"{where} (question_id {qid})"
        text = require(e, "question", str, where, text=True)
        image = require(e, "image", str, where)
        answer = e.get("answer")
        if answer is not None:
            answer = [answer] if isinstance(answer, str) else answer
            if not isinstance(answer, list) or not all(isinstance(a, str) for a in answer):
                raise DataError(f"{where}: field 'answer' must be a string or a list of strings")
        if answer is not None and not answer:
            raise DataError(f"{where}: field 'answer' is an empty list (leave the field out for a question "
                            "without answers)")
        examples.append(Example(id=qid, images=[root / image], text=text, answers=answer,
                                question_type=require(e, "question_type", str, where, default="")))
        if answer is None:
            unanswered.append(f"entry {i} (question_id {qid})")
    check_labels_all_or_none(path, unanswered, len(examples), "answer")
    return examples


# --- metric and result file -----------------------------------------------------------------------
def vqa_metrics(predicted: list[str], examples: list[Example]) -> dict[str, float]:
    """Official accuracy (%) overall and per answer type, over the examples that have answers."""
    scored = [(vqa_accuracy(p, ex.answers), ex.kind) for p, ex in zip(predicted, examples) if ex.answers]
    if not scored:
        return {}
    metrics = {"vqa_acc": 100.0 * sum(s for s, _ in scored) / len(scored)}
    for kind in sorted({k for _, k in scored if k}):
        rows = [s for s, k in scored if k == kind]
        metrics[f"vqa_acc_{kind.replace('/', '_')}"] = 100.0 * sum(rows) / len(rows)
    return metrics


def accuracy_by_question_type(predicted: list[str], examples: list[Example]) -> list[dict]:
    """The official evaluation's per-question-type table: ``{"question_type", "count", "vqa_acc"}``
    for each type among the answered examples, most frequent first. Empty when no example has a
    type (official annotations carry ``question_type``; a list's entries may)."""
    rows: dict[str, list[float]] = {}
    for p, ex in zip(predicted, examples):
        if ex.answers and ex.question_type:
            rows.setdefault(ex.question_type, []).append(vqa_accuracy(p, ex.answers))
    return [{"question_type": t, "count": len(s), "vqa_acc": 100.0 * sum(s) / len(s)}
            for t, s in sorted(rows.items(), key=lambda item: (-len(item[1]), item[0]))]


def format_question_types(rows: list[dict]) -> str:
    if not rows:
        return ("no question types to break the accuracy down by (the official annotations file has "
                "'question_type'; a list's entries may have it too)")
    width = max(len("question type"), *(len(r["question_type"]) for r in rows))
    lines = [f"VQA accuracy by question type ({len(rows)} types, most frequent first)",
             f"  {'question type':{width}s}{'count':>8s}{'acc':>8s}"]
    lines += [f"  {r['question_type']:{width}s}{r['count']:8d}{r['vqa_acc']:8.2f}" for r in rows]
    return "\n".join(lines)


def write_results(path: str | Path, predicted: list[str], examples: list[Example]) -> None:
    """The eval-server result file: ``[{"question_id": int, "answer": str}, ...]``."""
    with open(path, "w") as f:
        json.dump([{"question_id": ex.id, "answer": p} for p, ex in zip(predicted, examples)], f)
