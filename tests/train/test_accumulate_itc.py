"""``train.accumulate_itc``: with gradient accumulation, ITC over the whole accumulated batch gives
the gradients of one unaccumulated step on that batch."""

import pytest
import torch

import maskvlm.pipeline as pipeline
from maskvlm.config import ConfigError
from tests.conftest import free_ports, micro_config, torchrun_env


def _gradients(synthetic_dir, out, *overrides) -> tuple[dict, dict]:
    """(gradients after one optimizer step, the step's logged metrics)."""
    captured = {}

    class Recording(pipeline.Trainer):
        def fit(self):
            metrics = super().fit()  # a step zeroes the gradients first, so after it they are still there
            captured["grads"] = {n: p.grad.clone() for n, p in self.task.named_parameters() if p.grad is not None}
            return metrics

    real, pipeline.Trainer = pipeline.Trainer, Recording
    try:
        cfg = micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                           f"train.output_dir={out}", "train.max_steps=1", "train.save_every=0", "train.log_every=1",
                           "train.precision=fp32", "train.clip_grad=0", "data.hflip=0", *overrides)
        metrics = pipeline.pretrain(cfg)["train"]
    finally:
        pipeline.Trainer = real
    return captured["grads"], metrics


def _assert_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    bad = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.allclose(a[k], b[k], atol=atol)}
    assert not bad, bad


@pytest.mark.parametrize("itc", ["softmax", "sigmoid"])
def test_accumulated_itc_gives_the_gradients_of_the_whole_batch(synthetic_dir, tmp_path, itc):
    only_itc = ("loss.itm=0", "loss.mlm=0", "loss.mim=0", f"model.itc_loss={itc}")
    whole, whole_metrics = _gradients(synthetic_dir, tmp_path / "whole", "train.batch_size=8", *only_itc)
    pooled, pooled_metrics = _gradients(synthetic_dir, tmp_path / "pooled", "train.batch_size=4",
                                        "train.grad_accum=2", "train.accumulate_itc=true", *only_itc)
    plain, _ = _gradients(synthetic_dir, tmp_path / "plain", "train.batch_size=4", "train.grad_accum=2", *only_itc)
    _assert_close(pooled, whole, atol=1e-6)  # temperature (and bias) included
    assert pooled_metrics["itc_loss"] == pytest.approx(whole_metrics["itc_loss"], rel=1e-5)
    assert pooled_metrics["loss"] == pytest.approx(whole_metrics["loss"], rel=1e-5)
    # without the pool each micro-batch has its own negatives: another gradient
    assert not torch.allclose(plain["model.itc_head.temp"], whole["model.itc_head.temp"], atol=1e-6)


def test_the_other_objectives_accumulate_as_before(synthetic_dir, tmp_path):
    """With every objective on, only ITC's part changes: the pooled step minus the plain one is the
    ITC-only pooled step minus the ITC-only plain one."""
    accum = ("train.batch_size=4", "train.grad_accum=2")
    full_pooled, _ = _gradients(synthetic_dir, tmp_path / "a", *accum, "train.accumulate_itc=true")
    full_plain, _ = _gradients(synthetic_dir, tmp_path / "b", *accum)
    only_itc = ("loss.itm=0", "loss.mlm=0", "loss.mim=0")
    itc_pooled, _ = _gradients(synthetic_dir, tmp_path / "c", *accum, "train.accumulate_itc=true", *only_itc)
    itc_plain, _ = _gradients(synthetic_dir, tmp_path / "d", *accum, *only_itc)
    for name in itc_pooled:
        if name in full_pooled:
            assert torch.allclose(full_pooled[name] - full_plain[name], itc_pooled[name] - itc_plain[name],
                                  atol=1e-5), name


def test_settings_it_does_not_combine_with_are_refused():
    with pytest.raises(ConfigError, match="train.accumulate_itc works with in-batch ITC"):
        micro_config("train.accumulate_itc=true", "train.grad_accum=2", recipe="albef")
    with pytest.raises(ConfigError, match="train.accumulate_itc needs an ITC loss"):
        micro_config("train.accumulate_itc=true", "loss.itc=0")


def _spawned(rank: int, synthetic_dir: str, runs: list):
    """Each of ``runs``, (port, out, overrides), one after the other in this process."""
    from pathlib import Path

    from maskvlm.train.distributed import shutdown

    for port, out, overrides in runs:
        torchrun_env(rank, 2, port)
        ok = False
        try:
            grads, _ = _gradients(Path(synthetic_dir), f"{out}/run", *overrides)
            if "train.fsdp=true" not in overrides:  # sharded gradients: the test compares the saved weights
                torch.save(grads, f"{out}/grads{rank}.pt")
            ok = True
        finally:
            shutdown(ok)


def test_two_ranks_accumulating_give_the_gradients_of_the_whole_batch(synthetic_dir, tmp_path):
    """Two ranks x 2 micro-batches x 2 pairs: the live features are gathered from both ranks with
    gradient, the rest of the pool from both ranks' cached features; DDP averages. The result is
    one process's gradient on the 8 pairs."""
    import torch.multiprocessing as mp

    only_itc = ("loss.itm=0", "loss.mlm=0", "loss.mim=0")
    run = (free_ports()[0], str(tmp_path), ("train.batch_size=2", "train.grad_accum=2", "train.accumulate_itc=true",
                                            *only_itc))
    mp.spawn(_spawned, args=(str(synthetic_dir), [run]), nprocs=2, join=True)
    whole, _ = _gradients(synthetic_dir, tmp_path / "whole", "train.batch_size=8", *only_itc)
    for rank in range(2):
        _assert_close(torch.load(tmp_path / f"grads{rank}.pt", weights_only=True), whole, atol=1e-6)


def test_retrieval_fine_tuning_accumulates_itc_too(synthetic_dir, tokenizer, tmp_path):
    from maskvlm.finetune import build_finetune_config, finetune
    from tests.conftest import save_micro_model

    init = save_micro_model(tmp_path / "init", tokenizer)
    cfg = build_finetune_config("retrieval", str(init), overrides=[
        f"data.train={synthetic_dir / 'train.json'}", "data.val=null", f"data.test={synthetic_dir / 'test.json'}",
        f"train.output_dir={tmp_path / 'ft'}", "train.max_steps=2", "train.save_every=0", "train.batch_size=4",
        "train.grad_accum=2", "train.accumulate_itc=true", "train.progress=false", "train.tensorboard=false",
        "data.num_workers=0", "train.warmup_steps=1", "eval.k=2"])
    result = finetune(cfg)
    assert result["step"] == 2 and "txt_r1" in result["test"] and result["train"]["itc_loss"] > 0


def test_fsdp_accumulating_trains_like_ddp(synthetic_dir, tmp_path):
    """Under FSDP the pool's passes run with the root's parameters gathered (the blocks gather
    themselves, on every rank together); one step gives DDP's weights."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    overrides = ("train.batch_size=2", "train.grad_accum=2", "train.accumulate_itc=true", "train.save_every=1",
                 "loss.itm=0", "loss.mlm=0", "loss.mim=0")
    runs = [(port, str(tmp_path / name), (*overrides, *extra))
            for port, (name, extra) in zip(free_ports(2), (("ddp", ()), ("fsdp", ("train.fsdp=true",))))]
    mp.spawn(_spawned, args=(str(synthetic_dir), runs), nprocs=2, join=True)
    ddp, fsdp = (load_file(str(tmp_path / name / "run" / "checkpoints" / "step-00000001" / "model.safetensors"))
                 for name in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys()
    # AdamW's first step is about lr x sign(gradient): rounding-level differences stay small
    diffs = sorted((fsdp[k] - ddp[k]).abs().max().item() for k in ddp)
    assert diffs[len(diffs) // 2] < 1e-7 and diffs[-1] < 1e-4, (diffs[len(diffs) // 2], diffs[-1])
