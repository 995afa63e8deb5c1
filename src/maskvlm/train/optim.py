"""AdamW with weight-decay groups and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "position_embeddings", "token_type_embeddings")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Biases, norms, the temperature and position/special tokens are not decayed."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(name.endswith(n) or f".{n}." in name for n in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, betas) -> torch.optim.Optimizer:
    groups = param_groups(module, weight_decay)
    use_fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=use_fused or None)


def warmup_cosine(warmup_steps: int, total_steps: int, lr: float, min_lr: float):
    """Multiplier of ``lr`` at each step: linear 0 -> 1 over the warm-up, then cosine down to min_lr/lr."""
    floor = min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, lr: float,
                    min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, lr, min_lr))
