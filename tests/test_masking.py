import pytest
import torch

from maskvlm.masking import IGNORE_INDEX, bert_mask, block_mask, mask_to_indices, maskable_tokens


def _text_batch():
    # [CLS]=2 ... [SEP]=3, padding 0; ordinary ids 10..29
    ids = torch.tensor([[2] + list(range(10, 20)) + [3] + [0] * 4,
                        [2] + list(range(10, 24)) + [3]])
    mask = (ids != 0).long()
    return ids, mask


@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.5])
def test_bert_mask_exact_ratio_and_never_special_or_padding(ratio):
    ids, attn = _text_batch()
    maskable = maskable_tokens(ids, attn, special_ids=[0, 1, 2, 3, 4])
    masked, labels = bert_mask(ids, maskable, ratio, mask_id=4, random_ids=torch.arange(10, 30),
                               generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    for row in range(2):
        assert int(chosen[row].sum()) == max(1, round(int(maskable[row].sum()) * ratio))
    assert not chosen[~maskable].any()
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen tokens untouched
    assert torch.equal(labels[chosen], ids[chosen])


def test_bert_mask_80_10_10_rule():
    ids = torch.randint(10, 1000, (400, 50))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    masked, labels = bert_mask(ids, maskable, 0.3, mask_id=4, random_ids=torch.arange(10, 1000),
                               generator=torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    frac_mask = (masked[chosen] == 4).sum().item() / n
    frac_same = (masked[chosen] == ids[chosen]).sum().item() / n
    assert abs(frac_mask - 0.8) < 0.02
    assert abs(frac_same - 0.1) < 0.02  # a random replacement rarely equals the original id
    assert not (masked[chosen] < 10).logical_and(masked[chosen] != 4).any()  # random ids are ordinary tokens


def test_bert_mask_is_seeded():
    ids, attn = _text_batch()
    maskable = maskable_tokens(ids, attn, [0, 1, 2, 3, 4])
    run = lambda s: bert_mask(ids, maskable, 0.3, 4, torch.arange(10, 30), torch.Generator().manual_seed(s))
    assert torch.equal(run(5)[0], run(5)[0])
    assert any(not torch.equal(run(5)[1], run(s)[1]) for s in range(6, 10))


@pytest.mark.parametrize("grid,ratio,block", [((8, 8), 0.6, 2), ((14, 14), 0.6, 2), ((7, 7), 0.5, 2), ((4, 4), 0.75, 2)])
def test_block_mask_exact_count(grid, ratio, block):
    mask = block_mask(16, grid, ratio, block, torch.Generator().manual_seed(0))
    n = grid[0] * grid[1]
    assert mask.shape == (16, n)
    assert (mask.sum(dim=1) == round(ratio * n)).all()
    assert mask_to_indices(~mask).shape == (16, n - round(ratio * n))


def test_block_mask_masks_whole_blocks():
    mask = block_mask(32, (8, 8), 0.6, 2, torch.Generator().manual_seed(0)).view(32, 4, 2, 4, 2)
    per_tile = mask.sum(dim=(2, 4))  # masked patches in each 2x2 tile
    partial = ((per_tile > 0) & (per_tile < 4)).sum(dim=(1, 2))
    assert (partial <= 1).all()  # at most one tile is partly masked (the one that makes the count exact)
    # seeded, and different seeds give different masks
    a = block_mask(4, (8, 8), 0.6, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, block_mask(4, (8, 8), 0.6, 2, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, block_mask(4, (8, 8), 0.6, 2, torch.Generator().manual_seed(4)))


def test_block_mask_covers_positions_uniformly():
    mask = block_mask(4000, (8, 8), 0.6, 2, torch.Generator().manual_seed(0)).float().mean(0)
    assert (mask - 0.6).abs().max() < 0.05


def test_mask_to_indices_rejects_ragged_masks():
    with pytest.raises(ValueError, match="different counts"):
        mask_to_indices(torch.tensor([[True, False], [True, True]]))
