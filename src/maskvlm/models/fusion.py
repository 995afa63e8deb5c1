"""Image cross-modality encoder: the image side of the fusion. Encoded visible patches are
scattered back onto the full grid with a learnable mask token at masked positions, then
pre-norm layers of self-attention over image tokens and cross-attention to text tokens."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import PreNormBlock, init_weights, run_blocks
from .vit import interpolate_pos_embed


class ImageCrossEncoder(nn.Module):
    checkpointing = False  # per-block activation checkpointing (train.activation_checkpointing)

    def __init__(self, width: int, layers: int, heads: int, text_width: int, num_patches: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # Fresh position embeddings: mask tokens carry no position of their own.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.blocks = nn.ModuleList(PreNormBlock(width, heads, mlp_ratio, cross_dim=text_width, dropout=dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, image_hidden: torch.Tensor, visible_idx: Optional[torch.Tensor], grid: tuple[int, int],
                text_hidden: torch.Tensor, text_mask: torch.Tensor,
                output_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """image_hidden (B, 1 + n, D) with patch indices ``visible_idx`` (B, n), or (B, 1 + N, D) and None.
        Returns (B, 1 + N, D) over the full patch grid; with ``output_positions`` (B, Lq) (token
        positions, [CLS] = 0) only those tokens (B, Lq, D), which the last block computes alone."""
        b, _, d = image_hidden.shape
        num_patches = grid[0] * grid[1]
        cls, patches = image_hidden[:, :1], image_hidden[:, 1:]
        if visible_idx is not None:
            full = self.mask_token.to(patches.dtype).expand(b, num_patches, d).clone()
            full.scatter_(1, visible_idx.unsqueeze(-1).expand(-1, -1, d), patches)
            patches = full
        x = torch.cat([cls, patches], dim=1) + interpolate_pos_embed(self.pos_embed, grid).to(patches.dtype)
        x = run_blocks(self, self.blocks, x, last_positions=output_positions, context=text_hidden,
                       context_mask=text_mask)
        return self.norm(x)
