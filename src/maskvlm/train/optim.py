"""AdamW with weight-decay groups and a linear warm-up followed by a cosine, linear, constant or
constant-then-cooldown learning-rate schedule."""

from __future__ import annotations

import math
import re
from typing import Callable, Optional

import torch
from torch import nn

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "position_embeddings", "token_type_embeddings")


def param_groups(module: nn.Module, weight_decay: float, lr: float = 0.0,
                 lr_scale: Optional[Callable[[str], float]] = None) -> list[dict]:
    """Biases, norms, the temperature and position/special tokens are not decayed. With
    ``lr_scale`` (parameter name -> multiplier) each distinct multiplier gets its own groups."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or any(name.endswith(n) or f".{n}." in name for n in _NO_DECAY_NAMES)
        scale = lr_scale(name) if lr_scale else 1.0
        groups.setdefault((no_decay, scale), []).append(p)
    out = []
    for (no_decay, scale), params in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if lr_scale:
            group.update(lr=lr * scale, lr_scale=scale)
        out.append(group)
    return out


_TOWERS = (  # (prefix, index offset attribute): the layers of each encoder tower, bottom to top
    (("model.visual_encoder.blocks.", None), ("model.image_cross_encoder.blocks.", "vision_layers")),
    (("model.text_encoder.layer.", None), ("model.text_cross_encoder.layer.", "text_layers")),
)
_EMBEDDINGS = ("model.visual_encoder.patch_embed", "model.visual_encoder.cls_token", "model.visual_encoder.pos_embed",
               "model.visual_encoder.mask_token", "model.text_encoder.embeddings.")


def layerwise_lr_scale(model_config, layer_decay: float, head_lr_mult: float) -> Callable[[str], float]:
    """Multiplier for a fine-tuning task's parameter names (``model.*`` = the pre-trained model,
    anything else = the new task head). Embeddings are layer 0, encoder layer i is i + 1 counted
    through the tower (unimodal then cross-modality layers), and a tower of L layers scales layer
    l by ``layer_decay ** (L + 1 - l)``; other pre-trained parameters (ITC/ITM heads, final norms)
    keep the full rate; the task head gets ``head_lr_mult``."""
    m = model_config
    depth = {0: m.vision_layers + m.image_cross_layers, 1: m.text_layers + m.cross_layers}

    def scale(name: str) -> float:
        if not name.startswith("model."):
            return head_lr_mult
        if name.startswith(_EMBEDDINGS):
            tower = 1 if name.startswith("model.text_encoder") else 0
            return layer_decay ** (depth[tower] + 1)
        for tower, stages in enumerate(_TOWERS):
            for prefix, offset in stages:
                if name.startswith(prefix):
                    index = int(re.match(r"(\d+)", name[len(prefix):]).group(1))
                    layer = index + 1 + (getattr(m, offset) if offset else 0)
                    return layer_decay ** (depth[tower] + 1 - layer)
        return 1.0
    return scale


def freeze_parameters(model: nn.Module, prefixes: list[str]) -> str:
    """Turn off gradients of ``model``'s parameters named by ``prefixes`` (a parameter name, or a
    module path such as ``visual_encoder``); returns a summary for the log. A prefix that names no
    parameter is an error listing the model's parts."""
    params = dict(model.named_parameters())
    parts = []
    for prefix in prefixes:
        hits = [n for n in params if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not hits:
            top = sorted({n.split(".")[0] for n in params})
            raise ValueError(f"train.freeze: {prefix!r} names no parameter of this model; its parts are "
                             f"{', '.join(top)} (a prefix may go deeper, e.g. {top[0]}.<child>)")
        for n in hits:
            params[n].requires_grad_(False)
        parts.append(f"{prefix} ({sum(params[n].numel() for n in hits) / 1e6:.2f}M)")
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    return f"{', '.join(parts)}; {trainable / 1e6:.2f}M of the model's {total / 1e6:.2f}M parameters train"


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, betas,
                    lr_scale: Optional[Callable[[str], float]] = None, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; ``fused`` uses the single-kernel update where every parameter's device has one (CUDA,
    and CPU since torch 2.4), else the multi-tensor (foreach) update."""
    groups = param_groups(module, weight_decay, lr, lr_scale)
    devices = {p.device.type for g in groups for p in g["params"]}
    use_fused = fused and devices <= {"cuda", "cpu"} and (devices == {"cuda"} or _fused_on_cpu())
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=use_fused or None)


def _fused_on_cpu() -> bool:
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except RuntimeError:
        return False


SCHEDULES = ("cosine", "linear", "constant", "cooldown")


def lr_factor(schedule: str, warmup_steps: int, total_steps: int, lr: float, min_lr: float,
              cooldown_steps: int = -1):
    """Multiplier of ``lr`` at each step: linear 0 -> 1 over the warm-up, then

    - ``cosine``: cosine down to min_lr/lr at ``total_steps``;
    - ``linear``: straight down to min_lr/lr at ``total_steps``;
    - ``constant``: 1 to the end;
    - ``cooldown``: 1 until the last ``cooldown_steps`` (-1: a fifth of the steps), then straight
      down to min_lr/lr. A run can be made longer before its cooldown starts without changing the
      learning rate of any step done so far, which the other decaying schedules cannot offer."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    floor = min_lr / lr if lr > 0 else 0.0
    cooldown = total_steps // 5 if cooldown_steps < 0 else cooldown_steps
    cooldown_start = max(warmup_steps, total_steps - cooldown)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "cooldown":
            if step < cooldown_start:
                return 1.0
            progress = (step - cooldown_start) / max(1, total_steps - cooldown_start)
            return floor + (1 - floor) * (1 - min(1.0, progress))
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, lr: float,
                    min_lr: float, schedule: str = "cosine",
                    cooldown_steps: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(schedule, warmup_steps, total_steps, lr, min_lr, cooldown_steps))
