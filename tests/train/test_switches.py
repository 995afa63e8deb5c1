"""Memory/speed switches change how a step is computed, not what it computes."""

import copy

import pytest
import torch

from maskvlm.models.layers import set_activation_checkpointing
from maskvlm.models.model import build_model
from maskvlm.tasks.pretrain import PretrainTask


def _loss_and_grads(task, batch):
    task.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the hard-negative draws of ITM
    loss, _ = task(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients(model, config, batch):
    plain = PretrainTask(model, config)
    ckpt = copy.deepcopy(plain)
    assert set_activation_checkpointing(ckpt, True) == 4  # ViT, text, text cross, image cross encoders
    loss_a, grads_a = _loss_and_grads(plain, batch)
    loss_b, grads_b = _loss_and_grads(ckpt, batch)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name
    with torch.no_grad():  # no autograd: no recomputation either (e.g. the EMA teacher, evaluation)
        torch.manual_seed(3)
        a = ckpt(batch)[0]
        torch.manual_seed(3)
        assert torch.allclose(a, plain(batch)[0], atol=1e-6)


def test_activation_checkpointing_is_a_config_switch(synthetic_dir, tmp_path):
    from maskvlm.pipeline import pretrain
    from tests.conftest import micro_config

    cfg = micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                       f"train.output_dir={tmp_path}", "train.max_steps=2", "train.activation_checkpointing=true",
                       "data.vocab_size=200")
    pretrain(cfg)
    assert "activation checkpointing on in 4 encoder stacks" in (tmp_path / "train.log").read_text()


def _close(a, b, atol):
    return all(torch.allclose(a[k], b[k], atol=atol) for k in a) and a.keys() == b.keys()


def test_compiled_encoders_give_the_same_loss_and_gradients_and_names(model, config, batch):
    from maskvlm.models.layers import compile_encoders

    plain = PretrainTask(model, config)
    compiled = copy.deepcopy(plain)
    # aot_eager traces and partitions forward/backward like inductor but runs eager kernels: the
    # CI check of the graph capture (inductor's code generation takes minutes on 2 cores; the
    # benchmarks measure it)
    from torch._dynamo.utils import counters

    assert compile_encoders(compiled, backend="aot_eager") == 4
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints keep their names
    loss_a, grads_a = _loss_and_grads(plain, batch)
    frames = counters["frames"]["ok"]
    loss_b, grads_b = _loss_and_grads(compiled, batch)
    # the stacks really ran compiled (a stack that dynamo skips would run eager and match trivially)
    assert counters["frames"]["ok"] - frames >= 4
    assert torch.allclose(loss_a, loss_b, atol=1e-5) and _close(grads_a, grads_b, 1e-5)


def test_fused_adamw_matches_the_multi_tensor_update(model, config, batch):
    from maskvlm.train.optim import build_optimizer

    task = PretrainTask(model, config)
    _, grads = _loss_and_grads(task, batch)  # the same gradients for both (the optimizer alone is compared)
    results = []
    for fused in (True, False):
        copy_ = copy.deepcopy(task)
        opt = build_optimizer(copy_, 1e-3, 0.05, (0.9, 0.98), fused=fused)
        assert opt.defaults["fused"] is (True if fused else None)
        for step in range(3):
            for name, p in copy_.named_parameters():
                if name in grads:
                    p.grad = grads[name] * (step + 1)
            opt.step()
        results.append({k: v.detach().clone() for k, v in copy_.state_dict().items()})
    diff = max((results[0][k] - results[1][k]).abs().max().item() for k in results[0])
    assert diff < 1e-6, diff
    assert any(not torch.equal(results[0][k], task.state_dict()[k]) for k in results[0])  # it did update


def test_bf16_autocast_runs_matmuls_in_bf16_and_stays_close_to_fp32(model, config, batch):
    from maskvlm.runtime import autocast

    task = PretrainTask(model, config)
    loss_fp32, _ = _loss_and_grads(task, batch)
    seen = []
    linear = next(m for m in task.model.visual_encoder.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with autocast(torch.device("cpu"), "bf16"):
        loss_bf16, grads = _loss_and_grads(task, batch)
    hook.remove()
    assert seen and seen[0] == torch.bfloat16
    assert abs(float(loss_bf16) - float(loss_fp32)) < 0.05 * float(loss_fp32)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())  # fp32 master grads
    with autocast(torch.device("cpu"), "fp32"):
        seen.clear()
        assert torch.allclose(_loss_and_grads(task, batch)[0], loss_fp32)


def test_visible_only_masked_pass_encodes_only_the_visible_patches(config, batch):
    from maskvlm.models.model import build_model
    from maskvlm.objectives.base import StepState

    lengths = {}
    for visible_only in (True, False):  # off: mask tokens in place of the masked patches (a learned token)
        cfg = copy.deepcopy(config)
        cfg.masking.visible_only = visible_only
        torch.manual_seed(0)
        model = build_model(cfg)
        lengths[visible_only] = StepState(model, batch, visible_only=visible_only).masked_image.hidden.shape[1]
        loss, grads = _loss_and_grads(PretrainTask(model, cfg), batch)  # both settings train
        assert torch.isfinite(loss) and len(grads) > 20
    visible = int((~batch.image_mask[0]).sum())
    assert lengths == {True: 1 + visible, False: 1 + batch.image_mask.shape[1]}


def test_compile_and_fused_adamw_are_config_switches(synthetic_dir, tmp_path):
    from maskvlm.pipeline import pretrain
    from tests.conftest import micro_config

    cfg = micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                       f"train.output_dir={tmp_path}", "train.max_steps=2", "train.compile=true",
                       "train.compile_backend=aot_eager", "train.fused_adamw=false", "data.vocab_size=200",
                       "data.fixed_text_len=true")
    try:
        pretrain(cfg)
        # inductor's scatter-adds (embedding backward) are ordered only in this mode
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True
    log = (tmp_path / "train.log").read_text()
    assert "torch.compile (aot_eager) of 4 encoder stacks" in log
    assert "deterministic algorithms on" in log
    assert f"captions padded to data.max_text_len={cfg.data.max_text_len} in every batch" in log


@pytest.mark.parametrize("recipe", ["albef", "mamo", "semmim", "mlim"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_in_every_recipe(recipe, tokenizer, synthetic_dir):
    # teachers (MAMO, ALBEF, SemMIM), latent and prototype targets, MLIM's single stream and decoder
    from maskvlm.data.formats import PairDataset, PretrainCollator
    from maskvlm.data.transforms import ImageTransform
    from tests.conftest import micro_config

    config = micro_config(recipe=recipe)
    m = config.model
    m.vocab_size = tokenizer.vocab_size
    transform = ImageTransform(m.image_size, config.data.mean, config.data.std, train=True, hflip=0.5)
    dataset = PairDataset(synthetic_dir / "train.json", None, transform, two_views=config.loss.proto > 0)
    collator = PretrainCollator(tokenizer, config.data.max_text_len, 0.3, 0.6, (m.image_size // m.patch_size,) * 2, 2)
    batch = collator([dataset[i] for i in range(8)])
    torch.manual_seed(0)
    plain = PretrainTask(build_model(config), config)
    ckpt = copy.deepcopy(plain)
    assert set_activation_checkpointing(ckpt, True) >= 1
    loss_a, grads_a = _loss_and_grads(plain, batch)
    loss_b, grads_b = _loss_and_grads(ckpt, batch)
    assert torch.allclose(loss_a, loss_b, atol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_evaluation_runs_compiled_stacks_eager(model, config, batch):
    # evaluation's no-grad calls and re-ranking batch sizes would otherwise compile new graphs
    from torch._dynamo.utils import counters

    from maskvlm.models.layers import compile_encoders
    from maskvlm.train.loop import eager_evaluation

    task = PretrainTask(copy.deepcopy(model), config)
    compile_encoders(task, backend="aot_eager")

    def encode():
        with torch.no_grad():
            return task.model.encode_image(batch.images[:3]).hidden

    frames = counters["frames"]["ok"]
    with eager_evaluation(True):
        eager = encode()
    assert counters["frames"]["ok"] == frames  # nothing compiled
    with eager_evaluation(False):
        compiled = encode()
    assert counters["frames"]["ok"] > frames  # outside it the same call compiles (the check can fail)
    assert torch.allclose(eager, compiled, atol=1e-5)


def test_a_device_name_torch_does_not_know_is_an_error_naming_it():
    # was torch's "Expected one of cpu, cuda, ipu, ... device type at start of device string: tpu" traceback
    from maskvlm.runtime import resolve_device
    with pytest.raises(ValueError, match="device 'tpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"
    # a type torch knows that this build or machine lacks: was the first tensor move's traceback
    # ("PyTorch is not linked with support for mps devices", "Torch not compiled with XPU enabled")
    for name in ("mps", "xpu"):
        if not getattr(torch.backends.mps if name == "mps" else torch.xpu, "is_available")():
            with pytest.raises(ValueError, match=f"device '{name}' requested but this torch build has no {name}"):
                resolve_device(name)
