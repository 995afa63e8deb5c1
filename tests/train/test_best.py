"""Best-weights selection: each val evaluation is compared on ``best_metric``; the best weights go to
OUTPUT/best, survive a resume, and with ``eval.test_on=best`` the test file is evaluated with them."""

import json

import pytest
import torch
from safetensors.torch import load_file

import maskvlm.pipeline as pipeline
from maskvlm.config import ConfigError, best_metric
from maskvlm.inference import VLM
from maskvlm.pipeline import pretrain
from maskvlm.train.checkpoint import list_checkpoints, load_trainer_state
from tests.conftest import micro_config


def _config(synthetic_dir, out, *overrides):
    return micro_config(f"data.train={synthetic_dir / 'train.json'}", f"data.val={synthetic_dir / 'val.json'}",
                        f"data.test={synthetic_dir / 'test.json'}", f"train.output_dir={out}", "train.max_steps=3",
                        "train.save_every=1", "train.keep_last=3", "eval.every_steps=1", *overrides)


def _fingerprint(tensors) -> float:
    return float(sum(t.double().sum() for t in tensors))


@pytest.fixture
def falling_val(monkeypatch):
    """The real retrieval evaluation, but the val r_mean falls with each call (so the first val
    evaluation is the best), and every evaluation reports a fingerprint of the weights it saw."""
    real, calls = pipeline.make_retrieval_eval, []

    def fake(model, tokenizer, config, path, progress=False):
        run = real(model, tokenizer, config, path, progress=progress)

        def evaluate():
            metrics = run()
            if str(path).endswith("val.json"):
                calls.append(path)
                metrics["r_mean"] = 50.0 - len(calls)
            metrics["weights"] = _fingerprint(model.state_dict().values())
            return metrics
        return evaluate
    monkeypatch.setattr(pipeline, "make_retrieval_eval", fake)
    return calls


def test_the_best_val_weights_are_kept_and_tested_on_request(synthetic_dir, tmp_path, falling_val):
    result = pretrain(_config(synthetic_dir, tmp_path / "run", "eval.test_on=best"))
    assert len(falling_val) == 3  # steps 1 and 2 in training, step 3 at the end
    assert result["best"] == {"step": 1, "metric": "r_mean", "value": 49.0}
    best = tmp_path / "run" / "best"
    info = json.loads((best / "best.json").read_text())
    assert (info["step"], info["val"]["r_mean"]) == (1, 49.0)
    step1 = load_file(str(list_checkpoints(tmp_path / "run")[0] / "model.safetensors"))
    kept = load_file(str(best / "model.safetensors"))
    assert kept.keys() == {k[len("model."):] for k in step1 if k.startswith("model.")}  # the model alone
    assert all(torch.equal(v, step1[f"model.{k}"]) for k, v in kept.items())
    # the test file was evaluated with the step-1 weights, not the last ones
    model = VLM.from_pretrained(best, device="cpu").model
    assert result["test"]["weights"] == pytest.approx(_fingerprint(model.state_dict().values()), rel=1e-9)
    last = VLM.from_pretrained(tmp_path / "run", device="cpu").model
    assert result["test"]["weights"] != pytest.approx(_fingerprint(last.state_dict().values()), rel=1e-9)
    assert load_trainer_state(list_checkpoints(tmp_path / "run")[-1])["best"]["step"] == 1


def test_the_best_so_far_survives_a_resume(synthetic_dir, tmp_path, falling_val):
    pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=2"))
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == 1
    falling_val.clear()  # the resumed run's val scores start high again: 49, 48
    result = pretrain(_config(synthetic_dir, tmp_path / "run"), resume="auto", overrides=["train.max_steps=4"])
    # restored best: 49 at step 1 (the first run's final val gave 48); the resumed run's 49 does not beat it
    assert result["best"] == {"step": 1, "metric": "r_mean", "value": 49.0}


def test_best_metric_defaults_and_checks():
    assert best_metric(micro_config()) == "r_mean"
    assert best_metric(micro_config("task.name=vqa")) == "vqa_acc"
    assert best_metric(micro_config("task.name=nlvr2", "eval.best_metric=acc_other")) == "acc_other"
    with pytest.raises(ConfigError, match="eval.test_on"):
        micro_config("eval.test_on=first")
    with pytest.raises(ConfigError, match="needs eval.keep_best=true"):
        micro_config("eval.test_on=best", "eval.keep_best=false")


def test_early_stopping_after_patience_evaluations_without_a_new_best(synthetic_dir, tmp_path, falling_val):
    # val r_mean 49, 48, 47, ...: step 1 is the best, steps 2 and 3 bring nothing, so patience 2 stops at step 3
    result = pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=10", "eval.patience=2",
                              "eval.test_on=best"))
    assert result["stopped_early"] and result["step"] == 3 and not result["interrupted"]
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step-00000003"
    assert result["best"]["step"] == 1 and "test" in result  # the run still ends with its evaluations
    with pytest.raises(ConfigError, match="eval.patience=2: .* needs eval.every_steps > 0"):
        micro_config("eval.every_steps=0", "eval.patience=2")
