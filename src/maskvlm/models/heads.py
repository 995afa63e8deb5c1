"""Output heads on top of the encoders: ITC projections with a learnable temperature (and bias),
the ITM binary head, the MLM head (decoder tied to the word embeddings) and the pixel head."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import init_weights

TEMP_MIN, TEMP_MAX = 0.001, 0.5


class ITCHead(nn.Module):
    """Projections of the image and text [CLS] to unit ITC features, the learnable temperature and,
    for the sigmoid loss (``bias`` given), a learnable logit bias."""

    def __init__(self, image_width: int, text_width: int, embed_dim: int, temp: float = 0.07,
                 bias: Optional[float] = None):
        super().__init__()
        self.vision_proj = nn.Linear(image_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.apply(init_weights)

    @classmethod
    def from_config(cls, image_width: int, text_width: int, c) -> "ITCHead":
        """The head ``c`` (a ModelConfig) describes: with ``itc_loss=sigmoid``, a logit bias too."""
        return cls(image_width, text_width, c.embed_dim, c.temp, c.itc_bias_init if c.itc_loss == "sigmoid" else None)

    def image_features(self, image_cls: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_cls).float(), dim=-1)

    def text_features(self, text_cls: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_cls).float(), dim=-1)

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(TEMP_MIN, TEMP_MAX)


class ITMHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 2)
        self.apply(init_weights)

    def forward(self, fused_cls: torch.Tensor) -> torch.Tensor:
        return self.fc(fused_cls)


class MLMHead(nn.Module):
    """BERT prediction head; ``decoder.weight`` is the word-embedding matrix (tied)."""

    def __init__(self, width: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)
        self.decoder = nn.Linear(width, word_embeddings.num_embeddings)
        self.apply(init_weights)
        self.decoder.weight = word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(F.gelu(self.dense(hidden))))


class PixelHead(nn.Module):
    """Linear map from an image token to the pixels of its patch (patch*patch*3 values)."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        self.fc = nn.Linear(width, patch_size * patch_size * 3)
        self.apply(init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(tokens)
