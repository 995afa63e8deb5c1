"""Masking policies, applied when a batch is collated: BERT 80/10/10 token masking and
block-wise patch masking. Both are seeded (a ``torch.Generator``) and mask exactly
``round(ratio * n)`` items per sample, so masked batches have fixed shapes."""

from __future__ import annotations

from typing import Iterable

import torch

IGNORE_INDEX = -100


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row (0 = smallest)."""
    return scores.argsort(dim=1).argsort(dim=1)


def bert_mask(input_ids: torch.Tensor, maskable: torch.Tensor, ratio: float, mask_id: int,
              random_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``round(ratio * #maskable)`` tokens per row (at least one where any is maskable).

    Of the chosen tokens 80% become ``mask_id``, 10% a random id from ``random_ids`` (ordinary
    vocabulary, no special tokens) and 10% stay. ``maskable`` (B, L) bool excludes special and
    padding tokens. Returns (masked ids, labels) with labels = IGNORE_INDEX where not chosen."""
    b, length = input_ids.shape
    n_maskable = maskable.sum(dim=1)
    n_mask = torch.round(n_maskable.float() * ratio).long()
    if ratio > 0:
        n_mask = torch.where(n_maskable > 0, n_mask.clamp(min=1), n_mask)
    scores = torch.rand(b, length, generator=generator)
    scores = scores.masked_fill(~maskable, 2.0)  # unmaskable tokens sort last
    chosen = _ranks(scores) < n_mask[:, None]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(b, length, generator=generator)
    replace_mask = chosen & (action < 0.8)
    replace_random = chosen & (action >= 0.8) & (action < 0.9)
    masked = input_ids.clone()
    masked[replace_mask] = mask_id
    picks = torch.randint(len(random_ids), (int(replace_random.sum()),), generator=generator)
    masked[replace_random] = random_ids[picks]
    return masked, labels


def maskable_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype)
    return attention_mask.bool() & ~torch.isin(input_ids, special)


def block_mask(batch_size: int, grid: tuple[int, int], ratio: float, block: int,
               generator: torch.Generator) -> torch.Tensor:
    """Block-wise patch mask (B, rows*cols) bool, True = masked, exactly ``round(ratio * N)`` per row.

    The grid is tiled with ``block x block`` squares (edge tiles may be smaller); tiles are masked
    whole in random order and the last one partially, so the count is exact."""
    rows, cols = grid
    n = rows * cols
    target = int(round(ratio * n))
    if target == 0:
        return torch.zeros(batch_size, n, dtype=torch.bool)
    r = torch.arange(rows).repeat_interleave(cols) // block
    c = torch.arange(cols).repeat(rows) // block
    tiles_per_row = -(-cols // block)
    tile_of_patch = r * tiles_per_row + c
    n_tiles = int(tile_of_patch.max()) + 1
    tile_rank = _ranks(torch.rand(batch_size, n_tiles, generator=generator))
    # Primary key: the tile's random rank; secondary (in [0, 0.5)): random order inside the tile.
    key = tile_rank[:, tile_of_patch].float() + 0.5 * torch.rand(batch_size, n, generator=generator)
    return _ranks(key) < target


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool with the same count per row -> (B, count) sorted indices of the True entries."""
    counts = mask.sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError("mask rows have different counts; visible-only encoding needs equal counts per sample")
    b = mask.shape[0]
    return mask.nonzero(as_tuple=False)[:, 1].view(b, -1)
