"""Checks that need a CUDA GPU; skipped elsewhere (CI has none). On a GPU machine:
``python -m pytest -q tests/train/test_gpu.py`` (also part of ``bash benchmarks/gpu_session.sh train``)."""

import copy

import pytest
import torch

from maskvlm.tasks.pretrain import PretrainTask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _no_dropout(config):
    config.model.hidden_dropout = config.model.attention_dropout = 0.0  # same function eager and compiled
    return config


def test_a_step_makes_no_host_device_synchronisation(config, batch):
    from maskvlm.models.model import build_model

    task = PretrainTask(build_model(config), config).cuda()
    on_gpu = batch.to("cuda", non_blocking=True)
    task(on_gpu)[0].backward()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = task(on_gpu)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_stacks_match_eager_on_the_gpu(config, batch, mode):
    """Loss and gradients of compiled encoder stacks (inductor; with CUDA-graph replay for
    ``reduce-overhead``) against eager, over several steps so that recorded graphs are replayed."""
    from maskvlm.models.layers import compile_encoders
    from maskvlm.models.model import build_model

    config = _no_dropout(config)
    eager = PretrainTask(build_model(config), config).cuda()
    compiled = copy.deepcopy(eager)
    compile_encoders(compiled, "inductor", mode)
    on_gpu = batch.to("cuda")
    for step in range(4):
        results = []
        for task in (eager, compiled):
            if mode:
                torch.compiler.cudagraph_mark_step_begin()
            task.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same ITM negatives for both
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = task(on_gpu)
            loss.backward()
            results.append((loss.detach().float(), {n: p.grad.detach().clone() for n, p in task.named_parameters()
                                                    if p.grad is not None}))
        (loss_a, grads_a), (loss_b, grads_b) = results
        assert grads_a.keys() == grads_b.keys()
        torch.testing.assert_close(loss_b, loss_a, rtol=2e-2, atol=1e-3)
        worst = max(((grads_b[n] - grads_a[n]).norm() / grads_a[n].norm().clamp_min(1e-6)).item() for n in grads_a)
        assert worst < 0.1, f"step {step}: relative gradient difference {worst:.3f}"


def test_fp16_training_on_the_gpu_tracks_fp32(synthetic_dir, tmp_path):
    """``train.precision=fp16`` (loss scaling) on the GPU: the first loss matches fp32's, the run learns,
    and the loss scale is logged."""
    import json

    from maskvlm.pipeline import pretrain
    from tests.conftest import micro_config

    losses = {}
    for precision in ("fp16", "fp32"):
        out = tmp_path / precision
        pretrain(micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                              f"train.output_dir={out}", f"train.precision={precision}", "train.device=cuda",
                              "train.max_steps=12", "train.log_every=1", "model.hidden_dropout=0",
                              "model.attention_dropout=0"))
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        losses[precision] = [r["loss"] for r in rows]
        if precision == "fp16":
            assert "loss_scale" in rows[-1] and rows[-1]["skipped_nonfinite"] == 0
    # the first logged loss comes before any update: the same batch and weights in both precisions
    assert abs(losses["fp16"][0] - losses["fp32"][0]) < 0.02 * losses["fp32"][0]
    assert losses["fp16"][-1] < losses["fp16"][0]  # and fp16 learns (after its few overflow steps)
