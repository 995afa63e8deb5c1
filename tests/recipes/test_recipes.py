"""Every packaged recipe pre-trains from the CLI entry point and resumes exactly."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from maskvlm.config import build_config, list_recipes
from maskvlm.pipeline import pretrain
from maskvlm.train.checkpoint import list_checkpoints
from tests.conftest import MICRO

RECIPES = ["albef", "itc", "mamo", "maskvlm", "mlim", "semmim"]
# micro sizes; a small queue so that it wraps around within the run
SMALL = {"albef": ["momentum.queue_size=20"], "semmim": ["prototypes.num=16"], "mlim": ["model.single_layers=2"]}


def _config(recipe, synthetic_dir, out, *overrides):
    return build_config(recipe, overrides=MICRO + SMALL.get(recipe, []) + [
        f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
        f"train.output_dir={out}", *overrides])


def test_every_recipe_is_listed_with_one_line():
    assert sorted(list_recipes()) == RECIPES
    out = subprocess.run([sys.executable, "-m", "maskvlm.cli", "recipes"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == RECIPES
    assert all(len(line.split()) > 3 for line in lines)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "maskvlm"])  # maskvlm: tests/train
def test_recipe_trains_and_resumes_exactly(recipe, synthetic_dir, tmp_path):
    extra = ("train.max_steps=6", "train.save_every=3", "train.keep_last=5", "train.log_every=1")
    pretrain(_config(recipe, synthetic_dir, tmp_path / "full", *extra))
    full = list_checkpoints(tmp_path / "full")
    pretrain(_config(recipe, synthetic_dir, tmp_path / "resumed", *extra), resume=str(full[0]))
    a = load_file(str(full[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "resumed")[-1] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    if recipe in ("albef", "mamo", "semmim"):  # the EMA teacher and its state travel with the checkpoint
        assert any(k.startswith("teacher.") for k in a)
        name = "itc_head.vision_proj.weight"
        assert not torch.equal(a[f"teacher.model.{name}"], a[f"model.{name}"])  # the teacher lags the student
    if recipe == "albef":
        assert int(a["objectives.itc.queue.filled"]) == 20  # 6 steps x 8 pairs wrapped a 20-slot queue
        assert int(a["objectives.itc.queue.ptr"]) == 48 % 20
        assert int(a["updates"]) == 6


def test_exported_weights_leave_the_teacher_out(synthetic_dir, tmp_path):
    from maskvlm.models.io import model_weights
    pretrain(_config("albef", synthetic_dir, tmp_path / "run", "train.max_steps=2"))
    weights = model_weights(list_checkpoints(tmp_path / "run")[-1])
    assert weights and not any(k.startswith(("teacher", "objectives")) for k in weights)


def test_single_stream_recipe_fine_tunes_a_classifier_with_modality_dropout(synthetic_dir, tmp_path):
    from maskvlm.finetune import build_finetune_config
    pretrain(_config("mlim", synthetic_dir, tmp_path / "pre", "train.max_steps=2"))
    cfg = build_finetune_config("retrieval", str(tmp_path / "pre"), overrides=["task.modality_dropout=0.3"])
    assert cfg.model.arch == "single_stream" and cfg.loss.recon == 0 and cfg.loss.itc == 1


def test_recipe_config_errors_name_the_key():
    from maskvlm.config import ConfigError
    with pytest.raises(ConfigError, match="loss.recon needs"):
        build_config("maskvlm", overrides=["loss.recon=1"])
    with pytest.raises(ConfigError, match="visible_only"):
        build_config("mlim", overrides=["masking.visible_only=true"])
    with pytest.raises(ConfigError, match="modality_probs"):
        build_config("mlim", overrides=["masking.modality_probs=[0.5,0.5,0.5]"])
    with pytest.raises(ConfigError, match="loss.mim"):
        build_config("mlim", overrides=["loss.mim=1"])
    with pytest.raises(ConfigError, match="image_policy"):
        build_config("semmim", overrides=["masking.image_policy=clever"])
