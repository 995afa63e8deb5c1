"""Zero-shot image classification: the image-folder reader and its errors, class embeddings from
prompt templates, ITM re-ranking, the metrics, the synthetic class folders and the CLI."""

import json

import pytest
import torch

from maskvlm.cli import main
from maskvlm.data.synthetic_tasks import class_names, generate_classes
from maskvlm.inference import VLM
from maskvlm.tasks import zeroshot
from tests.conftest import micro_config, save_micro_model


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    return generate_classes(tmp_path_factory.mktemp("classes"), "shape", per_class=3, image_size=32, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_micro_model(tmp_path_factory.mktemp("model"), tokenizer, "train.precision=fp32")


def test_synthetic_class_folders_are_complete_deterministic_and_reused(classes, tmp_path):
    folder = zeroshot.load_image_folder(classes)
    assert folder.classnames == sorted(class_names("shape")) and len(folder.paths) == 15
    assert folder.labels == [i for i in range(5) for _ in range(3)]
    again = generate_classes(tmp_path / "again", "shape", per_class=3, image_size=32, progress=False)
    assert (again / "circle" / "0001.png").read_bytes() == (classes / "circle" / "0001.png").read_bytes()
    stamp = (again / "circle" / "0001.png").stat().st_mtime_ns
    generate_classes(tmp_path / "again", "shape", per_class=3, image_size=32, progress=False)
    assert (again / "circle" / "0001.png").stat().st_mtime_ns == stamp  # reused, not redrawn
    pairs = zeroshot.load_image_folder(generate_classes(tmp_path / "pairs", "color-shape", per_class=1,
                                                        image_size=32, progress=False))
    assert len(pairs.classnames) == 35 and "blue circle" in pairs.classnames  # folder blue_circle
    with pytest.raises(ValueError, match="unknown class attribute 'size'"):
        class_names("size")


def test_image_folder_errors_name_the_problem(tmp_path, classes):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        zeroshot.load_image_folder(tmp_path / "nope")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="one sub-folder per class .at least 2., found 1"):
        zeroshot.load_image_folder(tmp_path / "one")
    (tmp_path / "one" / "dog").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        zeroshot.load_image_folder(tmp_path / "one")
    with pytest.raises(ValueError, match="2 class names given for the 5 class folders"):
        zeroshot.load_image_folder(classes, ["a", "b"])
    names = zeroshot.load_image_folder(classes, [f"class {i}" for i in range(5)]).classnames
    assert names == [f"class {i}" for i in range(5)]
    listing = tmp_path / "names.json"
    listing.write_text(json.dumps(["x", 3]))
    with pytest.raises(ValueError, match="JSON list of non-empty strings"):
        zeroshot.read_classnames(listing)
    text = tmp_path / "names.txt"
    text.write_text("red circle\n\n blue square \n")
    assert zeroshot.read_classnames(text) == ["red circle", "blue square"]
    with pytest.raises(ValueError, match="exactly one"):
        zeroshot._check_templates(["a photo"])


class _Oracle:
    """Stands in for a VLM: features of texts and images that say exactly which class they show."""

    def __init__(self, classnames, itm_right=True):
        self.classnames = classnames
        self.itm_right = itm_right
        self.itm_pairs = 0

    def _onehot(self, index, size=8):
        v = torch.zeros(size)
        v[index] = 1.0
        return v

    def encode_texts(self, texts):
        # the class name picks the direction; one template ("odd {}") adds a constant that averaging keeps small
        rows = []
        for t in texts:
            c = next(i for i, n in enumerate(self.classnames) if n in t)
            v = self._onehot(c) + (0.5 * self._onehot(7) if t.startswith("odd") else 0)
            rows.append(v / v.norm())
        return torch.stack(rows)

    def encode_images(self, images, batch_size=64):
        # each image "looks like" its own class, but with a pull towards class 0 that fools ITC for class 1
        rows = []
        for label in images:
            v = self._onehot(label) + (1.5 * self._onehot(0) if label == 1 else 0)
            rows.append(v / v.norm())
        return torch.stack(rows)

    def itm_score(self, images, texts, batch_size=64):
        self.itm_pairs += len(texts)
        right = [self.classnames[label] in t for label, t in zip(images, texts)]
        return torch.tensor([float(r == self.itm_right) for r in right])


def test_classification_averages_templates_and_itm_re_ranks_the_top_k():
    names = ["red circle", "blue square", "green cross"]
    labels = [0, 1, 2, 1]
    vlm = _Oracle(names)
    templates = ["a {}.", "odd {} here"]
    emb = zeroshot.class_embeddings(vlm, names, templates)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3))
    scores = zeroshot.classify(vlm, labels, names, templates)
    m = zeroshot.accuracy_metrics(scores, labels, names)
    assert scores.argmax(1).tolist() == [0, 0, 2, 0]  # ITC is fooled on class 1
    assert m["top1"] == 50.0 and m["per_class"] == {"red circle": 100.0, "blue square": 0.0, "green cross": 100.0}
    assert m["mean_per_class"] == pytest.approx(200 / 3) and m["chance_top1"] == pytest.approx(100 / 3)
    reranked = zeroshot.classify(vlm, labels, names, templates, rerank=2)
    assert reranked.argmax(1).tolist() == labels  # ITM picks the right one of the top 2
    assert vlm.itm_pairs == 4 * 2 * 2  # images x k x templates
    wrong = zeroshot.classify(_Oracle(names, itm_right=False), labels, names, templates, rerank=3)
    assert (wrong.argmax(1) != torch.tensor(labels)).all()  # the ITM score, not ITC, decides inside the top k


def test_cli_classifies_an_image_folder(model_dir, classes, tmp_path, capsys):
    out = tmp_path / "zs.json"
    assert main(["evaluate", "classification", "--checkpoint", str(model_dir), "--data", str(classes),
                 "--template", "a {} on a background", "--rerank", "2", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "15 images, 5 classes, 1 templates, ITM re-rank of the top 2" in text and "chance (top-1)" in text
    metrics = json.loads(out.read_text())
    assert 0 <= metrics["top1"] <= metrics["top5"] == 100.0  # 5 classes: the top 5 hold every class
    assert len(metrics["predictions"]) == 15 and metrics["predictions"][0]["label"] == "circle"
    assert main(["evaluate", "classification", "--checkpoint", str(model_dir), "--data", str(classes),
                 "--template", "no slot"]) == 2
    assert "exactly one '{}'" in capsys.readouterr().err


def test_vlm_features_feed_the_classifier(model_dir, classes):
    vlm = VLM.from_pretrained(model_dir, device="cpu", precision="fp32")
    folder = zeroshot.load_image_folder(classes)
    scores = zeroshot.classify(vlm, folder.paths[:4], folder.classnames, ["a {}"], batch_size=3)
    emb = vlm.encode_texts([f"a {n}" for n in folder.classnames])
    expected = vlm.encode_images(folder.paths[:4]) @ emb.t()
    assert torch.allclose(scores, expected, atol=1e-5)


# --- linear probe -------------------------------------------------------------------------------------
def test_logistic_probe_separates_separable_classes_and_not_random_labels():
    from maskvlm.tasks.probe import _held_out, linear_probe

    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 16, generator=gen)
    def draw(n):
        y = torch.arange(4).repeat_interleave(n)
        return centres[y] + torch.randn(len(y), 16, generator=gen), y.tolist()
    (tx, ty), (sx, sy) = draw(15), draw(10)
    names = ["a", "b", "c", "d"]
    m = linear_probe(tx, ty, sx, sy, names)
    assert m["top1"] >= 95 and m["train_top1"] >= 95 and m["weight_decay"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    assert len(m["val_top1"]) == 7 and m["classes"] == 4 and m["images"] == 40
    shuffled = torch.as_tensor(sy)[torch.randperm(40, generator=gen)].tolist()
    assert linear_probe(tx, ty, sx, shuffled, names)["top1"] <= 50  # chance is 25
    held = _held_out(torch.as_tensor(ty), 0.2, 0)
    assert [int(held[torch.as_tensor(ty) == c].sum()) for c in range(4)] == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(tx, ty, sx, sy, names, val_fraction=1.0)


def test_probe_features_of_both_architectures(model_dir, classes, tokenizer, tmp_path):
    from maskvlm.models.model import build_model
    from maskvlm.tasks.probe import evaluate_probe, image_features

    vlm = VLM.from_pretrained(model_dir, device="cpu", precision="fp32")
    folder = zeroshot.load_image_folder(classes)
    cls = image_features(vlm, folder.paths[:3], "cls", batch_size=2)
    with torch.no_grad():
        hidden = vlm.model.encode_image(vlm._image_tensor(folder.paths[:3])).hidden
    assert torch.allclose(cls, hidden[:, 0], atol=1e-5)
    assert torch.allclose(image_features(vlm, folder.paths[:3], "mean"), hidden[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(image_features(vlm, folder.paths[:3], "itc"), vlm.encode_images(folder.paths[:3]))
    cfg = micro_config("model.single_layers=2", "train.precision=fp32", recipe="mlim")
    cfg.model.vocab_size = tokenizer.vocab_size
    single = VLM(build_model(cfg), cfg, tokenizer, device="cpu", precision="fp32")
    assert image_features(single, folder.paths[:3], "cls").shape == (3, 32)
    other = generate_classes(tmp_path / "colours", "color", per_class=1, image_size=32, progress=False)
    with pytest.raises(ValueError, match="same class folders; only in training: circle"):
        evaluate_probe(vlm, folder, zeroshot.load_image_folder(other), progress=False)
    with pytest.raises(ValueError, match="unknown feature kind 'pool'"):
        image_features(vlm, folder.paths[:1], "pool")


def test_cli_linear_probe(model_dir, classes, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["evaluate", "linear-probe", "--checkpoint", str(model_dir), "--train", str(classes), "--test",
                 str(classes), "--features", "mean", "--out", str(out), "--no-progress"]) == 0
    assert "linear probe on mean features" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert metrics["features"] == "mean" and metrics["train_images"] == 15 and 0 <= metrics["top1"] <= 100


def test_a_labelled_json_list_is_read_like_a_folder(classes, tmp_path, model_dir, capsys):
    folder = zeroshot.load_image_folder(classes)
    listing = tmp_path / "labels.json"
    listing.write_text(json.dumps([{"image": str(p.relative_to(classes)), "label": folder.classnames[y]}
                                   for p, y in zip(folder.paths, folder.labels)]))
    read = zeroshot.load_image_folder(listing, image_root=classes)
    assert read.classnames == folder.classnames and read.labels == folder.labels and read.paths == folder.paths
    fixed = zeroshot.load_image_folder(listing, ["triangle", "square", "diamond", "cross", "circle"], classes)
    assert fixed.classnames[fixed.labels[0]] == "circle" and fixed.labels[0] == 4  # the given order
    with pytest.raises(ValueError, match="labels not among the 2 class names: circle, cross"):
        zeroshot.load_image_folder(listing, ["square", "triangle"], classes)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(ValueError, match="entry 0 needs string fields 'image' and 'label'"):
        zeroshot.load_image_folder(bad)
    assert main(["evaluate", "classification", "--checkpoint", str(model_dir), "--data", str(listing),
                 "--image-root", str(classes), "--no-progress"]) == 0
    assert "15 images, 5 classes" in capsys.readouterr().out
