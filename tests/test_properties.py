"""Property-based tests (hypothesis): masking, tokenisation and collation over random shapes,
ratios and strings."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from maskvlm.data.formats import PretrainCollator  # noqa: E402
from maskvlm.masking import bert_mask, block_mask, mask_to_indices, maskable_tokens, random_patch_mask  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(b=st.integers(1, 6), rows=st.integers(1, 9), cols=st.integers(1, 9), ratio=st.floats(0, 0.99),
       block=st.integers(1, 4), seed=st.integers(0, 2 ** 31))
def test_block_mask_exact_count_per_row(b, rows, cols, ratio, block, seed):
    mask = block_mask(b, (rows, cols), ratio, block, torch.Generator().manual_seed(seed))
    assert mask.shape == (b, rows * cols) and mask.dtype == torch.bool
    # round(ratio * N) with N = rows * cols, as documented: ratio * rows * cols rounds differently at
    # halves (0.7 * 5 * 9 = 31.5 -> 32, but 0.7 * 45 = 31.499999999999996 -> 31)
    n_masked = round(ratio * (rows * cols))
    assert (mask.sum(1) == n_masked).all()
    idx = mask_to_indices(~mask)  # equal counts per row: visible-only encoding always works
    assert idx.shape == (b, rows * cols - n_masked)


@SETTINGS
@given(ratios=st.lists(st.floats(0, 1), min_size=1, max_size=6), n=st.integers(1, 50), seed=st.integers(0, 2 ** 31))
def test_random_patch_mask_counts(ratios, n, seed):
    r = torch.tensor(ratios)
    mask = random_patch_mask(r, n, torch.Generator().manual_seed(seed))
    assert mask.sum(1).tolist() == torch.round(r.float() * n).long().tolist()


@SETTINGS
@given(b=st.integers(1, 5), length=st.integers(2, 20), ratio=st.floats(0.01, 0.99), seed=st.integers(0, 2 ** 31),
       data=st.data())
def test_bert_mask_only_touches_maskable_tokens(b, length, ratio, seed, data):
    maskable = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length),
                                               min_size=b, max_size=b)))
    ids = torch.randint(5, 50, (b, length), generator=torch.Generator().manual_seed(seed))
    out, labels = bert_mask(ids, maskable, ratio, 3, torch.arange(5, 50), torch.Generator().manual_seed(seed))
    chosen = labels != -100
    assert not (chosen & ~maskable).any()  # never a special or padding position
    assert torch.equal(out[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    for row in range(b):
        n = int(maskable[row].sum())
        expected = max(1, round(ratio * n)) if n else 0
        assert int(chosen[row].sum()) == expected


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@SETTINGS
@given(texts=st.lists(text, min_size=1, max_size=5), max_len=st.integers(3, 40))
def test_tokenizer_any_string_fits_max_len(tokenizer, texts, max_len):
    ids, mask = tokenizer(texts, max_len)
    assert ids.shape == mask.shape and ids.shape[0] == len(texts) and ids.shape[1] <= max_len
    assert (ids[:, 0] == tokenizer.cls_id).all()
    lengths = mask.sum(1)
    assert (lengths >= 2).all()  # [CLS] and [SEP] always survive truncation
    assert (ids[torch.arange(len(texts)), lengths - 1] == tokenizer.sep_id).all()
    maskable = maskable_tokens(ids, mask, tokenizer.special_ids)
    assert not (maskable & (mask == 0)).any()


@SETTINGS
@given(b=st.integers(1, 6), captions=st.lists(text, min_size=6, max_size=6), seed=st.integers(0, 1000),
       text_ratio=st.floats(0, 0.9), image_ratio=st.floats(0, 0.9))
def test_collator_shapes_for_any_batch(tokenizer, b, captions, seed, text_ratio, image_ratio):
    samples = [dict(image=torch.zeros(3, 32, 32), caption=captions[i], image_id=i, index=i, seed=seed + i,
                    skipped={"bad caption": 1} if i == 0 else {}) for i in range(b)]
    batch = PretrainCollator(tokenizer, 24, text_ratio, image_ratio, (4, 4), 2)(samples)
    assert batch.images.shape == (b, 3, 32, 32) and batch.input_ids.shape[0] == b
    assert batch.skipped == {"bad caption": 1}
    if image_ratio > 0:
        assert (batch.image_mask.sum(1) == round(image_ratio * 16)).all()
    if text_ratio > 0:
        assert batch.mlm_labels.shape == batch.input_ids.shape
