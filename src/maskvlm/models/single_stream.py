"""A single-stream vision-language transformer (the MLIM recipe).

Text tokens and image embeddings are concatenated, ``[text tokens; image CLS; image regions]``,
each with its own position and modality embeddings, and one transformer encodes the pair.
Images are embedded by a shallow CNN of 2x2 stride-2 convolutions (``log2(patch_size)`` of
them), so each embedding sees exactly one ``patch x patch`` region and the regions do not
overlap: replacing an embedding with the mask token hides that region and nothing else. A
mirrored stack of 2x2 stride-2 transposed convolutions with a sigmoid decodes image tokens
back to pixels in [0, 1].

The class offers the two-stream model's interface, so the objectives, retrieval evaluation
and fine-tuning tasks run on it unchanged: ``encode_text`` / ``encode_image`` return the
embedded (not yet transformed) tokens, ``fuse`` runs the joint transformer over a pair and
returns the text positions, and ``image_features`` / ``text_features`` run it over one
modality alone (the unimodal inputs that modality dropout trains for)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .heads import ITCHead, ITMHead, MLMHead
from .layers import PreNormBlock, init_weights, run_blocks, set_attention_impl, take_positions
from .text import BertEmbeddings, TextOutput
from .vit import VisionOutput


def _stage_widths(width: int, stages: int) -> list[int]:
    """Channel widths of the CNN stages, doubling up to ``width`` (e.g. 48, 96, 192)."""
    return [max(16, width // 2 ** (stages - 1 - i)) for i in range(stages - 1)] + [width]


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each position (no statistics shared between regions)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNNEmbedder(nn.Module):
    """(B, 3, H, W) -> (B, N, D) region embeddings with non-overlapping receptive fields."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        stages = int(math.log2(patch_size))
        if 2 ** stages != patch_size or stages < 1:
            raise ValueError(f"model.patch_size={patch_size}: the CNN embedder needs a power of two >= 2")
        layers: list[nn.Module] = []
        channels = 3
        for i, out in enumerate(_stage_widths(width, stages)):
            layers.append(nn.Conv2d(channels, out, kernel_size=2, stride=2))
            if i < stages - 1:
                layers += [ChannelNorm(out), nn.GELU()]
            channels = out
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten(2).transpose(1, 2)


class DeconvDecoder(nn.Module):
    """(B, N, D) region tokens on a (rows, cols) grid -> (B, 3, H, W) pixels in [0, 1]."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        stages = int(math.log2(patch_size))
        widths = list(reversed(_stage_widths(width, stages)))  # width, ..., smallest
        layers: list[nn.Module] = []
        for i in range(stages):
            out = widths[i + 1] if i + 1 < stages else 3
            layers.append(nn.ConvTranspose2d(widths[i], out, kernel_size=2, stride=2))
            if i < stages - 1:
                layers += [ChannelNorm(out), nn.GELU()]
        self.net = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])
        return torch.sigmoid(self.net(x))


class SingleStreamVLM(nn.Module):
    checkpointing = False  # per-block activation checkpointing (train.activation_checkpointing)

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        if c.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer)")
        if c.vision_width != c.text_width:
            raise ValueError(f"model.arch=single_stream needs model.vision_width == model.text_width "
                             f"(got {c.vision_width} and {c.text_width})")
        self.config = c
        width = c.text_width
        self.grid = (c.image_size // c.patch_size,) * 2
        num_regions = self.grid[0] * self.grid[1]
        self.text_embeddings = BertEmbeddings(c.vocab_size, width, c.max_position, c.type_vocab_size, c.hidden_dropout)
        self.image_embedder = CNNEmbedder(c.patch_size, width)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, width))
        self.image_pos = nn.Parameter(torch.zeros(1, 1 + num_regions, width))  # separate from the text positions
        self.modality = nn.Parameter(torch.zeros(2, width))  # 0: text, 1: image
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(PreNormBlock(width, c.text_heads, c.vision_mlp_ratio, dropout=c.hidden_dropout)
                                    for _ in range(c.single_layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.itc_head = ITCHead.from_config(width, width, c)
        self.itm_head = ITMHead(width)
        self.mlm_head = MLMHead(width, self.text_embeddings.word_embeddings)
        self.decoder = DeconvDecoder(c.patch_size, width)
        for module in (self.text_embeddings, self.blocks, self.norm):
            module.apply(init_weights)
        for p in (self.image_cls, self.image_pos, self.modality, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)
        self.modality_dropout = 0.0  # fine-tuning option: drop one modality of a training pair with this probability
        self.set_attention_impl(c.attention)

    def set_attention_impl(self, impl: str) -> None:
        set_attention_impl(self, impl)

    # --- embeddings -------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        hidden = self.text_embeddings(input_ids) + self.modality[0]
        return TextOutput(hidden, attention_mask.bool())

    def encode_image(self, images: torch.Tensor, visible_idx: Optional[torch.Tensor] = None,
                     masked: Optional[torch.Tensor] = None) -> VisionOutput:
        """Region embeddings; ``masked`` (B, N) bool replaces those regions' embeddings by the mask token."""
        if visible_idx is not None:
            raise ValueError("the single-stream model encodes masked images with mask tokens "
                             "(set masking.visible_only: false)")
        regions = self.image_embedder(images)
        if masked is not None:
            regions = torch.where(masked.unsqueeze(-1), self.mask_token.to(regions.dtype), regions)
        b = regions.shape[0]
        hidden = torch.cat([self.image_cls.expand(b, -1, -1).to(regions.dtype), regions], dim=1)
        return VisionOutput(hidden + self.image_pos.to(regions.dtype) + self.modality[1], None, self.grid)

    # --- the joint transformer ------------------------------------------------------------------
    def _transform(self, x: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = run_blocks(self, self.blocks, x, key_mask=key_mask)
        return self.norm(x)

    def joint(self, text_hidden: torch.Tensor, text_mask: torch.Tensor,
              image_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over ``[text; image]`` -> (text positions (B, L, D), image positions (B, 1 + N, D))."""
        length = text_hidden.shape[1]
        image_mask = torch.ones(image_hidden.shape[:2], dtype=torch.bool, device=image_hidden.device)
        text_mask = text_mask.bool()
        if self.training and self.modality_dropout > 0:
            text_mask, image_mask = self._drop_modality(text_mask, image_mask)
        x = self._transform(torch.cat([text_hidden, image_hidden.to(text_hidden.dtype)], dim=1),
                            torch.cat([text_mask, image_mask], dim=1))
        return x[:, :length], x[:, length:]

    def _drop_modality(self, text_mask: torch.Tensor, image_mask: torch.Tensor):
        """Per sample, with probability ``modality_dropout``, hide all image tokens or all text
        tokens but [CLS] (half the time each) from attention."""
        b = text_mask.shape[0]
        draw = torch.rand(b, device=text_mask.device)
        drop_image = draw < self.modality_dropout / 2
        drop_text = (draw >= self.modality_dropout / 2) & (draw < self.modality_dropout)
        image_mask = image_mask & ~drop_image[:, None]
        keep_text = torch.zeros_like(text_mask)
        keep_text[:, 0] = True
        text_mask = torch.where(drop_text[:, None], text_mask & keep_text, text_mask)
        return text_mask, image_mask

    def fuse(self, text_hidden: torch.Tensor, text_mask: torch.Tensor, image_hidden: torch.Tensor,
             image_index: Optional[torch.Tensor] = None, output_positions: Optional[torch.Tensor] = None,
             self_attended: bool = False) -> torch.Tensor:
        """As ``MaskVLM.fuse``; one stream has no per-image keys to share, so rows are gathered, and
        every token is computed (``output_positions`` only selects the returned ones). It has no
        text-only first step either (``text_self_attention`` is None), so ``self_attended`` must be False."""
        if self_attended:
            raise ValueError("the single-stream model has no text-only fusion step: self_attended must be False")
        if image_index is not None:
            image_hidden = image_hidden.index_select(0, image_index)
        fused = self.joint(text_hidden, text_mask, image_hidden)[0]
        return fused if output_positions is None else take_positions(fused, output_positions)

    def text_self_attention(self, text_hidden: torch.Tensor, text_mask: torch.Tensor) -> None:
        """None: in one stream every step of the fusion sees image and text tokens together."""
        return None

    def fuse_text(self, text: TextOutput, image_hidden: torch.Tensor) -> torch.Tensor:
        return self.fuse(text.hidden, text.attention_mask, image_hidden)

    def fuse_image(self, image: VisionOutput, text: TextOutput) -> torch.Tensor:
        return self.joint(text.hidden, text.attention_mask, image.hidden)[1]

    def itm_logits(self, fused_text: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused_text[:, 0])

    # --- unimodal passes (ITC features) ----------------------------------------------------------
    def image_tokens(self, image: VisionOutput) -> torch.Tensor:
        """The joint transformer's output over the image alone (B, 1 + N, D), CLS first."""
        return self._transform(image.hidden, None)

    def image_features(self, image: VisionOutput) -> torch.Tensor:
        return self.itc_head.image_features(self.image_tokens(image)[:, 0])

    def text_features(self, text: TextOutput) -> torch.Tensor:
        return self.itc_head.text_features(self._transform(text.hidden, text.attention_mask)[:, 0])

    def reconstruct(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Fused image positions (B, 1 + N, D) -> pixels (B, 3, H, W) in [0, 1]."""
        return self.decoder(image_tokens[:, 1:], self.grid)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        text = self.encode_text(input_ids, attention_mask)
        return self.joint(text.hidden, text.attention_mask, self.encode_image(images).hidden)
