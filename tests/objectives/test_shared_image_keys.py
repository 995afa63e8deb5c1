"""Fusion shares the image keys/values: each image's cross-attention projection is computed once
per step, however many text rows attend to it (ITM's positives and hard negatives, MLM). These
check that sharing changes neither the fused states nor the gradients, and that it happens."""

import torch

from maskvlm.objectives import ITM, MLM, StepState


def _grads(model, *tensors):
    grads = torch.autograd.grad(sum(t.square().sum() for t in tensors),
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
