"""ViT image encoder: patch embedding, CLS token, learnable (interpolatable) position
embeddings and pre-norm blocks. The masked image pass can encode only visible patches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PreNormBlock, init_weights, run_blocks


@dataclass
class VisionOutput:
    hidden: torch.Tensor  # (B, 1 + n, D): CLS then the encoded patches
    visible_idx: Optional[torch.Tensor]  # (B, n) patch indices of ``hidden[:, 1:]``; None = all patches in order
    grid: tuple[int, int]  # patch grid (rows, cols) of the input image


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize (1, 1 + g*g, D) position embeddings (CLS first) to a (rows, cols) patch grid, bicubically."""
    n = pos.shape[1] - 1
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"position embedding with {n} patch positions is not a square grid")
    if (side, side) == tuple(grid):
        return pos
    cls, patch = pos[:, :1], pos[:, 1:]
    d = patch.shape[-1]
    patch = patch.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos.dtype)
    return torch.cat([cls, patch], dim=1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, n) -> (B, n, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class VisionTransformer(nn.Module):
    checkpointing = False  # per-block activation checkpointing (train.activation_checkpointing)

    def __init__(self, image_size: int = 224, patch_size: int = 16, width: int = 768, layers: int = 12,
                 heads: int = 12, mlp_ratio: float = 4.0, use_mask_token: bool = False, dropout: float = 0.0):
        super().__init__()
        self.patch_size = patch_size
        self.width = width
        grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
        # SimMIM-style masked pass (visible_only off): masked patches are replaced by this token.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if use_mask_token else None
        self.blocks = nn.ModuleList(PreNormBlock(width, heads, mlp_ratio, dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, images: torch.Tensor, visible_idx: Optional[torch.Tensor] = None,
                masked: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None) -> VisionOutput:
        """images (B, 3, H, W). ``visible_idx`` (B, n): encode only those patches.
        ``masked`` (B, N) bool: replace those patches by the mask token (needs ``use_mask_token``).
        ``key_mask`` (B, 1 + N) bool: tokens other tokens may attend to (True = visible)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self.patch_embed(images)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        pos = interpolate_pos_embed(self.pos_embed, grid)
        if masked is not None:
            if self.mask_token is None:
                raise ValueError("this encoder was built without a mask token (masking.visible_only=true)")
            x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + pos[:, 1:]
        if visible_idx is not None:
            x = gather_tokens(x, visible_idx)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = run_blocks(self, self.blocks, x, key_mask=key_mask)
        return VisionOutput(hidden=self.norm(x), visible_idx=visible_idx, grid=grid)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C), patches in row-major order, pixels as (p, p, C)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = patches.shape[0]
    p = patch_size
    c = patches.shape[-1] // (p * p)
    x = patches.reshape(b, grid[0], grid[1], p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, grid[0] * p, grid[1] * p)
