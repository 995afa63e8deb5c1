"""Memory/speed switches change how a step is computed, not what it computes."""

import copy

import torch

from maskvlm.models.layers import set_activation_checkpointing
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
