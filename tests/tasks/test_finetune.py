"""Synthetic downstream data, and fine-tuning every task end to end on micro sizes: the loss
goes down, checkpoints carry the task's classes, evaluation reloads them, resume is exact."""

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from maskvlm.config import ConfigError
from maskvlm.data.formats import DataError
from maskvlm.data.synthetic_tasks import generate_task
from maskvlm.finetune import build_finetune_config, evaluate_task, finetune
from maskvlm.tasks import nlvr2, ve, vqa
from maskvlm.tasks.downstream import CLASSIFICATION_TASKS
from maskvlm.train.optim import layerwise_lr_scale

SMALL = {"vqa": {"train": 12, "val": 4, "test": 4}, "nlvr2": {"train": 12, "dev": 4, "test1": 4},
         "ve": {"train": 12, "dev": 4, "test": 4}}


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {t: generate_task(t, root / t, SMALL[t], image_size=32, seed=0, progress=False) for t in SMALL}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer):
    from tests.conftest import save_micro_model

    return save_micro_model(tmp_path_factory.mktemp("pretrained"), tokenizer)


def _files(task, task_data):
    return [task_data[task] / f for f in CLASSIFICATION_TASKS[task].synthetic_files]


def test_synthetic_tasks_are_balanced_and_read_by_the_real_loaders(task_data):
    big = generate_task("nlvr2", task_data["nlvr2"].parent / "nlvr2_big", {"train": 60, "dev": 2, "test1": 2},
                        image_size=32, progress=False)
    labels = Counter(e.label for e in nlvr2.load_nlvr2(big / "train.json"))
    assert labels[0] == labels[1] == 60  # one true and one false statement per image pair
    exs = ve.load_snli_ve(task_data["ve"] / "snli_ve_train.jsonl")
    assert Counter(e.label for e in exs) == {0: 12, 1: 12, 2: 12}
    questions = vqa.load_vqa(task_data["vqa"] / "v2_OpenEnded_mscoco_train2014_questions.json")
    kinds = Counter(e.kind for e in questions)
    assert set(kinds) == {"yes/no", "number", "other"} and all(len(e.answers) == 10 for e in questions)
    # the simulated annotators write answers in several surface forms that normalise to one
    assert any(len(set(e.answers)) > 1 and len({vqa.normalize_answer(a) for a in e.answers}) == 1 for e in questions)


def test_synthetic_task_generation_is_reused_and_deterministic(tmp_path):
    a = generate_task("ve", tmp_path / "a", SMALL["ve"], image_size=32, progress=False)
    b = generate_task("ve", tmp_path / "b", SMALL["ve"], image_size=32, progress=False)
    assert (a / "snli_ve_train.jsonl").read_text() == (b / "snli_ve_train.jsonl").read_text()
    stamp = (a / "snli_ve_train.jsonl").stat().st_mtime_ns
    generate_task("ve", tmp_path / "a", SMALL["ve"], image_size=32, progress=False)
    assert (a / "snli_ve_train.jsonl").stat().st_mtime_ns == stamp


def _config(task, pretrained, task_data, out, *extra):
    files = _files(task, task_data) if task != "retrieval" else [None, None, None]
    data = [f"data.train={files[0]}", f"data.val={files[1]}", f"data.test={files[2]}"] if files[0] else []
    return build_finetune_config(task, str(pretrained), overrides=data + [
        "train.batch_size=8", "train.max_steps=24", "train.warmup_steps=2", "train.lr=2e-3", "train.log_every=4",
        "train.progress=false", "train.tensorboard=false", "train.save_every=0", "eval.every_steps=0",
        "eval.batch_size=16", "eval.k=4", "data.num_workers=0", "data.max_text_len=24", "data.crop_scale=[1.0,1.0]",
        f"train.output_dir={out}", *extra])


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "ve"])
def test_finetune_classification_tasks(task, pretrained, task_data, tmp_path, capsys):
    out = tmp_path / task
    result = finetune(_config(task, pretrained, task_data, out))
    rows = _losses(out)
    assert rows[-1]["cls_loss"] < rows[0]["cls_loss"] * 0.8, [r["cls_loss"] for r in rows]
    primary = CLASSIFICATION_TASKS[task].primary
    assert 0 <= result["test"][primary] <= 100 and primary in result["val"]
    checkpoint = out / "checkpoints" / "step-00000024"
    classes = json.loads((checkpoint / "classes.json").read_text())
    if task == "vqa":
        assert "yes" in classes and "no" in classes
        results = json.loads((out / "predictions_test.json").read_text())
        assert set(results[0]) == {"question_id", "answer"} and results[0]["answer"] in classes
        assert "vqa_prior_acc" in result["test"]
    else:
        assert classes == list(CLASSIFICATION_TASKS[task].classes)
        assert ("consistency" in result["test"]) == (task == "nlvr2")
    # reloads model, head and classes; a predictions file in a folder not made yet (an error after the run before)
    again = evaluate_task(task, str(out), predictions=str(tmp_path / "new" / "predictions.json"), progress=False)
    assert again[primary] == pytest.approx(result["test"][primary])
    assert (tmp_path / "new" / "predictions.json").is_file()
    if task == "vqa":  # the official per-question-type table; every answered question has a type
        capsys.readouterr()
        by_type = evaluate_task(task, str(out), progress=False, by_question_type=True)["question_types"]
        assert "VQA accuracy by question type" in capsys.readouterr().out
        assert sum(r["count"] for r in by_type) == len(vqa.load_vqa(_files("vqa", task_data)[2]))
        assert sum(r["count"] * r["vqa_acc"] for r in by_type) / sum(r["count"] for r in by_type) \
            == pytest.approx(again["vqa_acc"])
    # the final val evaluation is the only one here, so the best weights are the last: same test figure
    assert result["best"] == {"step": 24, "metric": primary, "value": result["val"][primary]}
    from_best = evaluate_task(task, str(out / "best"), progress=False)
    assert from_best[primary] == pytest.approx(result["test"][primary])
    # a test split without labels (VQA test-dev, NLVR2 test-U): predictions only, and the output says so
    unlabelled, root = _without_labels(task, _files(task, task_data)[2], tmp_path / "unlabelled")
    capsys.readouterr()
    assert evaluate_task(task, str(out), data=str(unlabelled), image_root=root,
                         predictions=str(tmp_path / "u.json"), progress=False) == {}
    assert "has no " + ("answers" if task == "vqa" else "labels") + ", so nothing is scored; predictions written to" \
        in capsys.readouterr().out
    assert len(json.loads((tmp_path / "u.json").read_text())) == len(CLASSIFICATION_TASKS[task].load(unlabelled, root))


def _without_labels(task, path, folder):
    """(a copy of the evaluation file ``path`` with no labels or answers, the image root it needs)."""
    folder.mkdir()
    copy = folder / path.name
    if task == "vqa":  # the official questions file with no annotations file beside it
        copy.write_text(path.read_text())
        return copy, str(path.parent)
    key = "label" if task == "nlvr2" else "gold_label"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    copy.write_text("".join(json.dumps({k: v for k, v in r.items() if k != key}) + "\n" for r in rows))
    return copy, str(path.parent)


def test_a_training_file_without_labels_is_an_error(pretrained, task_data, tmp_path):
    train = _files("ve", task_data)[0]
    unlabelled, root = _without_labels("ve", train, tmp_path / "u")
    cfg = _config("ve", pretrained, task_data, tmp_path / "out", f"data.train={unlabelled}", f"data.image_root={root}")
    with pytest.raises(DataError, match="the training file has no labels"):
        finetune(cfg)
    # VQA's official questions file without its annotations file beside it
    questions, root = _without_labels("vqa", _files("vqa", task_data)[0], tmp_path / "q")
    cfg = _config("vqa", pretrained, task_data, tmp_path / "out2", f"data.train={questions}", f"data.image_root={root}")
    with pytest.raises(DataError, match=r"the training questions have no answers\. An official questions file takes "
                                        r"them from v2_mscoco_<split>_annotations\.json"):
        finetune(cfg)


def test_finetune_retrieval_starts_from_pretrained_weights(pretrained, synthetic_dir, tmp_path):
    out = tmp_path / "ret"
    cfg = _config("retrieval", pretrained, None, out, f"data.train={synthetic_dir / 'train.json'}",
                  f"data.test={synthetic_dir / 'test.json'}")
    assert (cfg.loss.mlm, cfg.loss.mim) == (0, 0)
    result = finetune(cfg)
    rows = _losses(out)
    assert rows[-1]["itc_loss"] < rows[0]["itc_loss"]
    assert "itm_loss" in rows[0] and "mlm_loss" not in rows[0]
    assert result["test"]["k"] == 4 and "txt_r1" in result["test"]


def test_finetune_resume_is_exact(pretrained, task_data, tmp_path):
    # 63 questions / 8 per batch: step 8 is in the second epoch; dropout on and evaluation in between
    extra = ("train.max_steps=8", "train.save_every=4", "train.keep_last=5", "eval.every_steps=2",
             "model.hidden_dropout=0.1")
    full = finetune(_config("vqa", pretrained, task_data, tmp_path / "full", *extra), evaluate_test=False)
    middle = tmp_path / "full/checkpoints/step-00000004"
    resumed = finetune(_config("vqa", pretrained, task_data, tmp_path / "part", *extra), resume=str(middle),
                       evaluate_test=False)
    assert resumed["step"] == full["step"] == 8
    a = load_file(str(tmp_path / "full/checkpoints/step-00000008/model.safetensors"))
    b = load_file(str(tmp_path / "part/checkpoints/step-00000008/model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("head.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_finetune_config_and_errors(pretrained, task_data, tmp_path):
    cfg = _config("nlvr2", pretrained, task_data, tmp_path / "x")
    assert cfg.task.name == "nlvr2" and cfg.task.init == str(pretrained) and cfg.data.hflip == 0.0
    assert cfg.model.vision_width == 32  # the architecture comes from the pre-trained model
    with pytest.raises(ConfigError, match="unknown task 'caption'"):
        build_finetune_config("caption", str(pretrained))
    with pytest.raises(ConfigError, match="task.layer_decay=1.5"):
        build_finetune_config("ve", str(pretrained), overrides=["task.layer_decay=1.5"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        build_finetune_config("ve", str(tmp_path / "nope"))


def test_a_missing_test_image_is_an_error_before_fine_tuning(pretrained, task_data, tmp_path):
    import shutil
    copy = tmp_path / "nlvr2"
    shutil.copytree(task_data["nlvr2"], copy)
    test_file = copy / CLASSIFICATION_TASKS["nlvr2"].synthetic_files[2]
    gone = nlvr2.load_nlvr2(test_file)[0].images[1]
    gone.unlink()
    cfg = _config("nlvr2", pretrained, {"nlvr2": copy}, tmp_path / "out")
    with pytest.raises(DataError, match=rf"image file not found: {gone} \(1 of 8 images missing"):
        finetune(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()  # found before training, not after it


def test_a_printed_config_names_its_pretrained_model(pretrained, tmp_path, capsys):
    """`finetune TASK --print-config > f.yaml` then `finetune TASK --config f.yaml` (or task.init=PATH)
    starts from the model the saved config names, with the same settings."""
    from maskvlm.cli import main

    assert main(["finetune", "ve", "--checkpoint", str(pretrained), "--print-config", "train.lr=3e-5",
                 "data.max_text_len=24"]) == 0
    saved = tmp_path / "ve.yaml"
    saved.write_text(capsys.readouterr().out)
    assert main(["finetune", "ve", "--config", str(saved), "--print-config"]) == 0
    assert capsys.readouterr().out == saved.read_text()
    by_override = build_finetune_config("ve", None, overrides=[f"task.init={pretrained}", "data.max_text_len=24"])
    assert by_override.task.init == str(pretrained) and by_override.model.vision_width == 32
    assert main(["finetune", "ve", "--print-config"]) == 2
    assert "task.init in --config" in capsys.readouterr().err


def test_layerwise_lr_scale(config):
    scale = layerwise_lr_scale(config.model, 0.5, 10.0)
    # micro: vision 2 + image-cross 1 layers -> depth 3; text 1 + cross 1 -> depth 2
    assert scale("head.net.0.weight") == 10.0
    assert scale("model.visual_encoder.patch_embed.proj.weight") == 0.5 ** 4
    assert scale("model.visual_encoder.blocks.0.attn.qkv.weight") == 0.5 ** 3
    assert scale("model.image_cross_encoder.blocks.0.mlp.fc1.weight") == 0.5 ** 1
    assert scale("model.text_encoder.embeddings.word_embeddings.weight") == 0.5 ** 3
    assert scale("model.text_encoder.layer.0.output.weight") == 0.5 ** 2
    assert scale("model.text_cross_encoder.layer.0.output.weight") == 0.5 ** 1
    assert scale("model.itm_head.fc.weight") == 1.0


def test_finetune_retrieval_with_momentum_distillation_ramps_alpha_over_the_first_epoch(pretrained, synthetic_dir,
                                                                                       tmp_path):
    # ALBEF fine-tunes retrieval with momentum distillation: momentum.alpha > 0 creates the EMA teacher (a copy
    # of the pre-trained model) and, as in pre-training, ramps the distillation weight over the first epoch
    out = tmp_path / "ret_mod"
    cfg = _config("retrieval", pretrained, None, out, f"data.train={synthetic_dir / 'train.json'}", "data.test=null",
                  "momentum.alpha=0.4", "momentum.queue_size=16")
    finetune(cfg, evaluate_test=False)
    alphas = [r["alpha"] for r in _losses(out)]
    assert alphas == sorted(alphas) and alphas[0] < 0.4 * 0.5, alphas
    assert "EMA teacher (decay 0.995): ITC queue of 16, momentum distillation weight 0.4" in (
        out / "train.log").read_text()


def test_several_training_files_are_joined_and_can_be_weighted(pretrained, task_data, tmp_path):
    """VQA on the train and val questions together (a test-dev submission's training set)."""
    train, val, _ = _files("vqa", task_data)
    spec = CLASSIFICATION_TASKS["vqa"]
    examples, files, sizes = spec.load_training(f"{train}::{val}", None)
    assert files == [train, val] and sizes == [len(vqa.load_vqa(train)), len(vqa.load_vqa(val))]
    assert [e.id for e in examples] == [e.id for e in vqa.load_vqa(train) + vqa.load_vqa(val)]
    cfg = _config("vqa", pretrained, task_data, tmp_path / "out", f"data.train={train}::{val}",
                  "data.train_weights=[1,3]", "train.max_steps=4")
    result = finetune(cfg, evaluate_test=False)
    assert result["step"] == 4
    assert f"{train.name}: {sizes[0]} entries -> 25.0% of an epoch" in (tmp_path / "out" / "train.log").read_text()
    # one file of the two without labels is named
    unlabelled, root = _without_labels("nlvr2", _files("nlvr2", task_data)[2], tmp_path / "u")
    with pytest.raises(DataError, match=rf"{unlabelled}: the training file has no labels"):
        CLASSIFICATION_TASKS["nlvr2"].load_training(f"{_files('nlvr2', task_data)[0]}::{unlabelled}", root)
