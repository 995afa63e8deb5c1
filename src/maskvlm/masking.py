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


def bert_mask(input_ids: torch.Tensor, maskable: torch.Tensor, ratio: float | torch.Tensor, mask_id: int,
              random_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``round(ratio * #maskable)`` tokens per row (at least one where any is maskable
    and the row's ratio is above 0); ``ratio`` is one float or a (B,) tensor of per-row ratios.

    Of the chosen tokens 80% become ``mask_id``, 10% a random id from ``random_ids`` (ordinary
    vocabulary, no special tokens) and 10% stay. ``maskable`` (B, L) bool excludes special and
    padding tokens. Returns (masked ids, labels) with labels = IGNORE_INDEX where not chosen."""
    b, length = input_ids.shape
    n_maskable = maskable.sum(dim=1)
    ratio = torch.as_tensor(ratio, dtype=torch.float32)  # a scalar, or (B,) one ratio per row
    n_mask = torch.round(n_maskable.float() * ratio).long()
    n_mask = torch.where((n_maskable > 0) & (ratio > 0), n_mask.clamp(min=1), n_mask)
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


def text_guided_mask(relevance: torch.Tensor, ratio: float, temp: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask ``round(ratio * N)`` patches per row, preferring those most related to the caption.

    ``relevance`` (B, N) scores each patch against its caption (e.g. the cosine of teacher patch
    and text features). Patches are drawn without replacement with probability proportional to
    ``softmax(relevance / temp)`` (Gumbel top-k), so the most related patches are masked most
    often but every patch can be chosen; a large ``temp`` approaches uniform random masking."""
    b, n = relevance.shape
    target = int(round(ratio * n))
    uniform = torch.rand(b, n, generator=generator, device=relevance.device if generator is None else "cpu")
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-9, 1 - 1e-9))).to(relevance.device)
    key = relevance.float() / temp + gumbel
    return _ranks(-key) < target


# Modes of modality-aware masking (MLIM), one drawn per sample.
IMAGE_HEAVY, TEXT_HEAVY, LIGHT_BOTH = 0, 1, 2


def modality_aware_ratios(batch_size: int, probs, heavy: float, light: float,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw a mode per sample with probabilities ``probs``: IMAGE_HEAVY masks ``heavy`` of the image
    and leaves the text intact, TEXT_HEAVY the reverse, LIGHT_BOTH masks ``light`` of each.
    Returns (modes, text ratios, image ratios), each (B,)."""
    modes = torch.multinomial(torch.tensor(probs, dtype=torch.float), batch_size, replacement=True,
                              generator=generator)
    text_of_mode = torch.tensor([0.0, heavy, light])
    image_of_mode = torch.tensor([heavy, 0.0, light])
    return modes, text_of_mode[modes], image_of_mode[modes]


def random_patch_mask(ratios: torch.Tensor, num_patches: int, generator: torch.Generator) -> torch.Tensor:
    """(B, N) bool: ``round(ratios[i] * N)`` uniformly random patches of row i are True."""
    counts = torch.round(ratios.float() * num_patches).long()
    return _ranks(torch.rand(len(ratios), num_patches, generator=generator)) < counts[:, None]
