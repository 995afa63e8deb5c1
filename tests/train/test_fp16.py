"""``train.precision=fp16``: autocast in float16 with dynamic loss scaling. Runs on the CPU here
(slowly); the same code path serves GPUs without bf16 (V100, T4)."""

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from maskvlm.config import ConfigError
from maskvlm.pipeline import pretrain
from maskvlm.train.checkpoint import list_checkpoints, load_trainer_state
from tests.conftest import micro_config


def _config(synthetic_dir, out, *overrides):
    return micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                        f"train.output_dir={out}", "train.precision=fp16", "train.log_every=1", *overrides)


def test_overflowing_steps_lower_the_scale_without_stopping_the_run(synthetic_dir, tmp_path, monkeypatch):
    # a start scale of 2^40 overflows fp16 gradients for about 25 steps, more than
    # train.max_nonfinite_in_row (20), which would stop a run if they counted as faults
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 40))
    pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=34", "train.warmup_steps=1"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    last = rows[-1]
    assert 20 <= last["skipped_overflow"] < 34 and last["skipped_nonfinite"] == 0
    assert last["loss_scale"] < 2.0 ** 17
    state = load_trainer_state(list_checkpoints(tmp_path / "run")[-1])
    assert state["skipped_overflow"] == last["skipped_overflow"] and state["scaler"]["scale"] == last["loss_scale"]
    assert all(r["loss"] == r["loss"] for r in rows)  # finite losses throughout


def test_fp16_resume_restores_the_loss_scale_and_gives_the_same_weights(synthetic_dir, tmp_path):
    extra = ("train.max_steps=6", "train.save_every=3", "train.keep_last=5")
    pretrain(_config(synthetic_dir, tmp_path / "full", *extra))
    full = list_checkpoints(tmp_path / "full")
    pretrain(_config(synthetic_dir, tmp_path / "resumed", *extra), resume=str(full[0]))
    a = load_file(str(full[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "resumed")[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_trainer_state(full[-1])["scaler"] == load_trainer_state(list_checkpoints(tmp_path / "resumed")[-1]
                                                                        )["scaler"]


def test_fp16_is_refused_with_fsdp():
    with pytest.raises(ConfigError, match="fp16 .* not available with train.fsdp"):
        micro_config("train.precision=fp16", "train.fsdp=true")
