"""Text-conditioned masked image modelling: the block-masked image, through the image encoder
and the image cross-modality encoder attending to the text, regresses the pixels of the
masked patches (L1; targets normalised with the dataset mean/std or, with ``norm_pix``, per patch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vit import patchify
from .base import ObjectiveOutput, StepState


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    target = patchify(images.float(), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


class MIM(nn.Module):
    def __init__(self, norm_pix: bool = False):
        super().__init__()
        self.norm_pix = norm_pix

    def forward(self, state: StepState) -> ObjectiveOutput:
        model, batch = state.model, state.batch
        pred = model.pixel_head(state.fused_masked_patches).float()  # masked patches only
        target = pixel_targets(batch.images, model.config.patch_size, self.norm_pix)
        target = target.reshape(-1, target.shape[-1]).index_select(0, batch.index("masked_patches"))
        return ObjectiveOutput(F.l1_loss(pred, target))
