"""Latent-space masked modelling against the EMA teacher (MAMO).

* ``MRM`` (masked representation modelling): the fused outputs of the jointly masked pair,
  at the masked text tokens and the masked image patches, go through a projector and regress
  the teacher's fused outputs of the unmasked pair at the same positions (L2).
* ``FeatureMIM``: the fused outputs at masked patches go through a projector and regress the
  teacher's image-encoder patch features of the unmasked image (L1).

Teacher targets are layer-normalised without affine parameters before the regression, which
keeps their scale fixed while the teacher drifts (a choice the paper leaves open; see
docs/recipes.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ObjectiveOutput, StepState


def projector(width: int, out: int | None = None) -> nn.Sequential:
    out = out or width
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, out))


def normalized_target(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:])


class MRM(nn.Module):
    def __init__(self, text_width: int, vision_width: int):
        super().__init__()
        self.text_projector = projector(text_width)
        self.image_projector = projector(vision_width)

    def forward(self, state: StepState) -> ObjectiveOutput:
        batch = state.batch
        losses, metrics = [], {}
        if batch.mlm_labels is not None:
            if batch.index("mlm_positions").numel():
                pred = self.text_projector(state.fused_mlm_tokens).float()
                target = normalized_target(state.at_mlm_positions(state.teacher_fused_text))
                losses.append(F.mse_loss(pred, target))
                metrics["mrm_text"] = losses[-1].detach()
        if batch.image_mask is not None:
            pred = self.image_projector(state.fused_masked_patches).float()
            target = normalized_target(state.at_masked_patches(state.teacher_fused_image))
            losses.append(F.mse_loss(pred, target))
            metrics["mrm_image"] = losses[-1].detach()
        if not losses:
            raise ValueError("MRM needs masked text or masked image (masking.text_ratio / image_ratio are 0)")
        return ObjectiveOutput(sum(losses) / len(losses), metrics)


class FeatureMIM(nn.Module):
    def __init__(self, vision_width: int):
        super().__init__()
        self.projector = projector(vision_width)

    def forward(self, state: StepState) -> ObjectiveOutput:
        mask = state.batch.image_mask
        if mask is None:
            raise ValueError("feature MIM needs image masks (masking.image_ratio is 0)")
        pred = self.projector(state.fused_masked_patches).float()
        target = normalized_target(state.at_masked_patches(state.teacher_image.hidden))
        return ObjectiveOutput(F.l1_loss(pred, target))
