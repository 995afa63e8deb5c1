"""A first-in-first-out queue of teacher features (and their image ids) that serves as extra
ITC negatives. The storage is made of buffers, so it is saved in every checkpoint and
restored on resume; only the filled part is ever used (no random placeholder features)."""

from __future__ import annotations

import torch
from torch import nn


class FeatureQueue(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size={size}: expected a positive integer")
        self.size = size
        self.register_buffer("image_feat", torch.zeros(size, dim))
        self.register_buffer("text_feat", torch.zeros(size, dim))
        self.register_buffer("image_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # slots holding real entries

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, image ids) of the filled slots, oldest order not kept."""
        n = int(self.filled)
        return self.image_feat[:n], self.text_feat[:n], self.image_ids[:n]

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Write a batch over the oldest entries, wrapping around the end. A batch larger than the
        queue keeps only its last ``size`` rows."""
        n = image_feat.shape[0]
        if n > self.size:
            image_feat, text_feat, image_ids = image_feat[-self.size:], text_feat[-self.size:], image_ids[-self.size:]
            n = self.size
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.image_feat[slots] = image_feat.to(self.image_feat.dtype)
        self.text_feat[slots] = text_feat.to(self.text_feat.dtype)
        self.image_ids[slots] = image_ids
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
