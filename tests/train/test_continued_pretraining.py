"""Continued pre-training (``maskvlm pretrain --checkpoint PATH``, ``task.init``): a new run starts from
a saved model's weights, architecture, tokenizer and image normalisation, with a fresh optimizer,
schedule and data order."""

import pytest
import torch
from safetensors.torch import load_file

from maskvlm.cli import main
from maskvlm.config import ConfigError, build_config
from maskvlm.models.io import read_config
from maskvlm.pipeline import pretrain
from maskvlm.train.checkpoint import list_checkpoints, load_trainer_state
from tests.conftest import micro_config


@pytest.fixture(scope="module")
def source(synthetic_dir, tmp_path_factory):
    """A micro MaskVLM run of 3 steps with a non-default image normalisation, exported."""
    run = tmp_path_factory.mktemp("source") / "run"
    pretrain(micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.test=null", "data.val=null",
                          f"train.output_dir={run}", "train.max_steps=3", "data.mean=[0.4,0.4,0.4]"))
    exported = run.parent / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(exported)]) == 0
    return exported


def _continue(synthetic_dir, source, out, *overrides, recipe="maskvlm"):
    # a learning rate of 1e-12: after two steps the weights are still the starting model's (to 1e-6)
    cfg = micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.test=null", "data.val=null",
                       f"train.output_dir={out}", f"task.init={source}", "train.max_steps=2", "train.lr=1e-12",
                       "train.min_lr=0", *overrides, recipe=recipe)
    pretrain(cfg)
    return list_checkpoints(out)[-1]


def test_a_new_run_starts_from_the_model_with_a_fresh_optimizer(synthetic_dir, source, tmp_path):
    last = _continue(synthetic_dir, source, tmp_path / "cont")
    start, now = load_file(str(source / "model.safetensors")), load_file(str(last / "model.safetensors"))
    assert len(start) > 100
    for k, v in start.items():
        torch.testing.assert_close(now[f"model.{k}"], v, atol=1e-6, rtol=0, msg=k)
    assert (last / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    state = load_trainer_state(last)
    assert state["step"] == 2 and last.name == "step-00000002"  # a new schedule, counted from 0
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {2.0}  # fresh AdamW moments
    config = read_config(last)
    assert config.task.init == str(source) and set(config.task.trained) == {"itc", "itm", "mlm", "mim"}
    assert config.data.mean == [0.4, 0.4, 0.4]  # the normalisation belongs to the weights


def test_the_teacher_of_a_continued_albef_run_starts_from_the_loaded_weights(synthetic_dir, source, tmp_path):
    last = _continue(synthetic_dir, source, tmp_path / "albef", "momentum.queue_size=16", recipe="albef")
    state = load_file(str(last / "model.safetensors"))
    teacher = {k[len("teacher.model."):]: v for k, v in state.items() if k.startswith("teacher.model.")}
    start = load_file(str(source / "model.safetensors"))
    assert teacher.keys() == start.keys()
    for k, v in start.items():
        torch.testing.assert_close(teacher[k], v, atol=1e-6, rtol=0, msg=k)


def test_the_architecture_comes_from_the_model_and_clashes_are_errors(source):
    cfg = build_config("maskvlm", "base", overrides=[f"task.init={source}"])
    assert (cfg.model.vision_width, cfg.model.image_size, cfg.data.mean) == (32, 32, [0.4, 0.4, 0.4])
    # the user's own model keys still apply (loading then names any tensor whose shape differs)
    assert build_config("maskvlm", overrides=[f"task.init={source}", "model.hidden_dropout=0.2"]
                        ).model.hidden_dropout == 0.2
    with pytest.raises(ConfigError, match="recipe mlim needs model.arch='single_stream'"):
        build_config("mlim", overrides=[f"task.init={source}"])
    with pytest.raises(ConfigError, match="cannot be combined"):
        build_config("maskvlm", overrides=[f"task.init={source}", f"model.text_init={source}"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        build_config("maskvlm", overrides=[f"task.init={source.parent / 'nope'}"])


def test_shapes_that_differ_are_named(synthetic_dir, source, tmp_path):
    with pytest.raises(ValueError, match="another shape"):
        _continue(synthetic_dir, source, tmp_path / "wide", "model.embed_dim=24")
