"""Pixel reconstruction (MLIM's RECON): the deconvolution decoder turns the fused image
positions of the masked pair back into an image with values in [0, 1]; the loss is the sum
of squared errors against the original pixels, per image, averaged over the batch. With
``region="masked"`` only pixels of masked regions count; ``"all"`` counts the whole image."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import ObjectiveOutput, StepState


def region_pixel_mask(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, N) region mask -> (B, 1, H, W) pixel mask."""
    b = mask.shape[0]
    m = mask.view(b, 1, grid[0], grid[1]).float()
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


class RECON(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float], region: str = "masked"):
        super().__init__()
        if region not in ("masked", "all"):
            raise ValueError(f"loss.recon_region={region!r}: expected 'masked' or 'all'")
        self.region = region
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, state: StepState) -> ObjectiveOutput:
        model, batch = state.model, state.batch
        pred = model.reconstruct(state.fused_masked_image).float()
        target = (batch.images.float() * self.std + self.mean).clamp(0, 1)
        squared = (pred - target) ** 2
        if self.region == "masked":
            if batch.image_mask is None:
                raise ValueError("RECON on masked regions needs image masks (masking ratios are 0)")
            squared = squared * region_pixel_mask(batch.image_mask, model.grid, model.config.patch_size)
        sse = squared.flatten(1).sum(dim=1)
        return ObjectiveOutput(sse.mean(), {"recon_mse": (squared.sum() / squared.numel()).detach()})
