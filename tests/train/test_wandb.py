"""``train.wandb``: metrics also go to a Weights & Biases run, which a resumed run continues."""

import sys
import types

import pytest

from maskvlm.pipeline import pretrain
from tests.conftest import micro_config


def _config(synthetic_dir, out, *overrides):
    return micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                        f"train.output_dir={out}", "train.log_every=1", "train.wandb=true",
                        "train.wandb_project=tests", *overrides)


class _Run:
    def __init__(self, calls, **kwargs):
        self.calls = calls
        calls.append(("init", kwargs))

    def log(self, data, step):
        self.calls.append(("log", step, data))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: _Run(calls, **kwargs)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_metrics_go_to_one_wandb_run_that_a_resume_continues(synthetic_dir, tmp_path, fake_wandb):
    pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=2"))
    init = fake_wandb[0][1]
    assert init["project"] == "tests" and init["name"] == "run" and init["resume"] == "allow"
    assert init["config"]["model"]["vision_width"] == 32 and init["config"]["train"]["wandb"] is True
    logged = [c for c in fake_wandb if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2] and "train/loss" in logged[0][2] and fake_wandb[-1] == ("finish",)
    fake_wandb.clear()
    pretrain(_config(synthetic_dir, tmp_path / "run"), resume="auto", overrides=["train.max_steps=3"])
    assert fake_wandb[0][1]["id"] == init["id"]  # the same W&B run goes on
    assert [c[1] for c in fake_wandb if c[0] == "log"] == [3]


def test_without_the_package_the_error_says_how_to_install_it(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=1"))


def test_a_real_offline_wandb_run(synthetic_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=2"))
    # as at the end of a process: wandb's service writes the run file behind finish(); in a long pytest
    # process it once held only its 7-byte header when read here
    wandb.teardown()
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and b"train/loss" in files[0].read_bytes()
