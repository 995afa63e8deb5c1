"""Fusion shares the image keys/values: each image's cross-attention projection is computed once
per step, however many text rows attend to it (ITM's positives and hard negatives, MLM). These
check that sharing changes neither the fused states nor the gradients, and that it happens."""

import torch

from maskvlm.objectives import ITM, MLM, StepState


def _grads(model, *tensors):
    # a fixed random weighting of the outputs: a sum of squares would be nearly constant after the
    # final LayerNorm, leaving gradients at rounding-noise size
    g = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in tensors)
    grads = torch.autograd.grad(loss,
                                [p for p in model.parameters() if p.requires_grad], allow_unused=True,
                                retain_graph=True)
    return [torch.zeros(()) if g is None else g for g in grads]


def test_indexed_fusion_equals_fusion_of_gathered_images(model, batch):
    torch.manual_seed(0)
    state = StepState(model, batch)
    text, images = state.text, state.image.hidden
    b = len(batch)
    index = torch.cat([torch.arange(b), torch.randint(0, b, (b,)), torch.arange(b).flip(0)])
    text_rows = text.hidden.index_select(0, index.roll(3))  # any text rows, 3B of them
    mask_rows = text.attention_mask.index_select(0, index.roll(3))
    expected = model.fuse(text_rows, mask_rows, images.index_select(0, index))
    by_index = model.fuse(text_rows, mask_rows, images, image_index=index)
    by_keys = model.fuse(text_rows, mask_rows, None, image_index=index, image_kv=model.image_keys(images))
    torch.testing.assert_close(by_index, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_keys, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(model, by_keys), _grads(model, expected)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_extra_images_join_the_batch_rows(model, batch):
    """The distributed ITM path: negative images from other ranks are rows B.. of the image set."""
    state = StepState(model, batch)
    b = len(batch)
    extra = torch.randn_like(state.image.hidden[:3])
    index = torch.tensor([0, b, b + 2, 1, b + 1, 0])
    text = state.text.hidden[:6]
    mask = state.text.attention_mask[:6]
    got = state.fuse_with_images(text, mask, index, extra)
    want = model.fuse(text, mask, torch.cat([state.image.hidden, extra]).index_select(0, index))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_itm_and_mlm_project_each_image_once(model, batch):
    rows = []
    hooks = [layer.crossattention.attn.kv.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
             for layer in model.text_cross_encoder.layer]
    try:
        state = StepState(model, batch)
        (ITM(global_negatives=False)(state).loss + MLM()(state).loss).backward()
    finally:
        for h in hooks:
            h.remove()
    # one projection of the B unmasked images per fusion layer, shared by 3B ITM rows and B MLM rows
    assert rows == [len(batch)] * len(model.text_cross_encoder.layer)


def test_single_stream_model_fuses_indexed_rows(tokenizer, batch):
    from tests.conftest import micro_config
    from maskvlm.models.model import build_model

    cfg = micro_config(recipe="mlim")
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    state = StepState(model, batch)
    index = torch.tensor([1, 0, 2, 2])
    text, mask = state.text.hidden[:4], state.text.attention_mask[:4]
    torch.testing.assert_close(state.fuse_with_images(text, mask, index),
                               model.fuse(text, mask, state.image.hidden.index_select(0, index)))
    # re-ranking and itm_score take the plain path: one stream has no text-only first step
    from maskvlm.tasks.retrieval import itm_scores

    assert model.text_self_attention(text, mask) is None
    enc = dict(image_hidden=state.image.hidden, text_hidden=text, text_mask=mask)
    scores = itm_scores(model, enc, index, torch.tensor([0, 1, 3, 2]), 3, torch.device("cpu"), "fp32")
    with torch.no_grad():
        logits = model.itm_logits(model.fuse(text[[0, 1, 3, 2]], mask[[0, 1, 3, 2]],
                                             state.image.hidden.index_select(0, index))).float()
    torch.testing.assert_close(scores, logits[:, 1] - logits[:, 0], rtol=1e-5, atol=1e-5)


def test_last_layer_at_chosen_positions_equals_full_output(model, batch):
    """Only the tokens a loss reads ([CLS] for ITM, masked patches for MIM) are computed in the last
    fusion layer; they still attend to every token, so they equal the full output at those tokens."""
    torch.manual_seed(0)
    state = StepState(model, batch)
    text, images = state.text, state.image.hidden
    b, length = text.hidden.shape[:2]
    positions = torch.stack([torch.randperm(length)[:3].sort().values for _ in range(b)])
    full = model.fuse(text.hidden, text.attention_mask, images)
    part = model.fuse(text.hidden, text.attention_mask, images, output_positions=positions)
    want = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(part, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(_grads(model, part), _grads(model, want)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    masked, ctx = state.masked_image, state.text
    n_patches = batch.image_mask.shape[1]
    img_pos = torch.stack([torch.randperm(1 + n_patches)[:5].sort().values for _ in range(b)])
    full = model.fuse_image(masked, ctx)
    part = model.fuse_image(masked, ctx, output_positions=img_pos)
    torch.testing.assert_close(part, full.gather(1, img_pos[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)


def test_objectives_read_the_pruned_rows(model, batch):
    """MIM's masked-patch rows and ITM's logits are the same through the pruned last layer."""
    from maskvlm.objectives import MIM

    state = StepState(model, batch)
    pruned = state.fused_masked_patches
    reference = StepState(model, batch)
    torch.testing.assert_close(pruned, reference.at_masked_patches(reference.fused_masked_image),
                               rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    itm = ITM(global_negatives=False)(StepState(model, batch))
    torch.manual_seed(1)
    full_state = StepState(model, batch)
    full_state.fuse_with_images = lambda t, m, idx, extra=None, output_positions=None: StepState.fuse_with_images(
        full_state, t, m, idx, extra)  # full outputs; the ITM head reads [:, 0]
    torch.testing.assert_close(itm.loss, ITM(global_negatives=False)(full_state).loss, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(MIM()(state).loss)


def test_mlm_reads_the_pruned_masked_tokens(model, batch):
    """MLM's rows come from a last layer that computes each caption's masked tokens only (rows
    padded to the longest count); they equal the full output at those tokens, in the same order."""
    from maskvlm.data.formats import padded_positions, padded_slots
    from maskvlm.masking import IGNORE_INDEX

    selected = batch.mlm_labels != IGNORE_INDEX
    positions, slots = padded_positions(selected), padded_slots(selected)
    assert positions.shape == (len(batch), int(selected.sum(1).max()))
    flat = (torch.arange(len(batch))[:, None] * selected.shape[1] + positions).flatten()[slots]
    torch.testing.assert_close(flat, batch.index("mlm_positions"), rtol=0, atol=0)

    state, reference = StepState(model, batch), StepState(model, batch)
    pruned = state.fused_mlm_tokens
    full = reference.at_mlm_positions(reference.fused_masked_text)
    torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(model, pruned), _grads(model, full)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_text_self_attention_once_equals_fusing_each_pair(tokenizer, batch):
    """Re-ranking runs the fusion's first, text-only step (the first layer's self-attention) once per
    distinct caption and hands it to ``fuse(self_attended=True)`` for each pair: the same fused
    states, whether the first layer is also the last (one cross layer, [CLS] alone) or not."""
    from tests.conftest import micro_config
    from maskvlm.models.model import build_model

    for layers in (1, 2):
        cfg = micro_config(f"model.cross_layers={layers}")
        cfg.model.vocab_size = tokenizer.vocab_size
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        state = StepState(model, batch)
        text, images = state.text, state.image.hidden
        pair_text = torch.tensor([0, 0, 3, 1, 3, 3, 2])
        pair_image = torch.tensor([1, 2, 0, 1, 2, 4, 4])
        first = model.text_self_attention(text.hidden, text.attention_mask)
        assert first.shape == text.hidden.shape
        rows, mask = text.hidden[pair_text], text.attention_mask[pair_text]
        cls = torch.zeros(len(pair_text), 1, dtype=torch.long)
        for positions in (None, cls):
            want = model.fuse(rows, mask, images, image_index=pair_image, output_positions=positions)
            got = model.fuse(first[pair_text], mask, images, image_index=pair_image, output_positions=positions,
                             self_attended=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        shared = model.fuse(first[pair_text], mask, None, image_index=pair_image, output_positions=cls,
                            image_kv=model.image_keys(images), self_attended=True)
        torch.testing.assert_close(shared, want, rtol=1e-5, atol=1e-5)
