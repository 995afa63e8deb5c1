import pytest
import torch

from maskvlm.masking import block_mask, mask_to_indices
from maskvlm.models.layers import Attention
from maskvlm.models.model import build_model
from maskvlm.models.vit import VisionTransformer, interpolate_pos_embed, patchify, unpatchify


def test_encoder_shapes_and_dtypes(model, batch, config):
    m = config.model
    n = (m.image_size // m.patch_size) ** 2
    image = model.encode_image(batch.images)
    assert image.hidden.shape == (8, 1 + n, m.vision_width) and image.hidden.dtype == torch.float32
    text = model.encode_text(batch.input_ids, batch.attention_mask)
    assert text.hidden.shape == (*batch.input_ids.shape, m.text_width)
    fused = model.fuse_text(text, image.hidden)
    assert fused.shape == text.hidden.shape
    assert model.itm_logits(fused).shape == (8, 2)
    assert model.mlm_head(fused).shape == (*batch.input_ids.shape, m.vocab_size)
    fused_image = model.fuse_image(image, text)
    assert fused_image.shape == image.hidden.shape
    assert model.pixel_head(fused_image[:, 1:]).shape == (8, n, m.patch_size ** 2 * 3)
    feats = model.image_features(image)
    assert feats.shape == (8, m.embed_dim)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # matmuls run in bf16; norms stay fp32
        assert model.itm_logits(model.fuse_text(text, image.hidden)).dtype == torch.bfloat16


def test_visible_only_equals_full_encoding_with_masked_tokens_dropped(model, batch):
    mask = block_mask(8, (4, 4), 0.5, 2, torch.Generator().manual_seed(0))
    visible = mask_to_indices(~mask)
    model.eval()
    short = model.encode_image(batch.images, visible_idx=visible).hidden
    # Full-length pass where nothing may attend to masked patches: visible tokens must agree.
    key_mask = torch.cat([torch.ones(8, 1, dtype=torch.bool), ~mask], dim=1)
    full = model.visual_encoder(batch.images, key_mask=key_mask).hidden
    torch.testing.assert_close(short[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    gathered = torch.gather(full[:, 1:], 1, visible.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(short[:, 1:], gathered, atol=1e-5, rtol=1e-5)
    # ... and differ from an unrestricted full pass (the masked patches do carry information).
    assert not torch.allclose(short[:, 0], model.encode_image(batch.images).hidden[:, 0], atol=1e-4)


def test_mask_token_variant_replaces_masked_patches(config, batch):
    config.masking.visible_only = False
    model = build_model(config).eval()
    mask = block_mask(8, (4, 4), 0.5, 2, torch.Generator().manual_seed(0))
    noisy = batch.images.clone()
    patches = patchify(noisy, 8)
    patches[mask] = torch.randn_like(patches[mask])
    noisy = unpatchify(patches, 8, (4, 4))
    a = model.encode_image(batch.images, masked=mask).hidden
    b = model.encode_image(noisy, masked=mask).hidden
    torch.testing.assert_close(a, b)  # masked pixels are never seen


def test_position_embedding_interpolation_to_other_resolution():
    vit = VisionTransformer(image_size=32, patch_size=8, width=16, layers=1, heads=2).eval()
    out = vit(torch.randn(2, 3, 48, 48))
    assert out.hidden.shape == (2, 1 + 36, 16) and out.grid == (6, 6)
    same = interpolate_pos_embed(vit.pos_embed, (4, 4))
    assert same is vit.pos_embed
    resized = interpolate_pos_embed(vit.pos_embed, (6, 6))
    torch.testing.assert_close(resized[:, 0], vit.pos_embed[:, 0])


def test_patchify_roundtrip():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    torch.testing.assert_close(patches[0, 1], images[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(patches, 8, (2, 3)), images)


def test_mlm_decoder_is_tied_to_word_embeddings(model):
    assert model.mlm_head.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight


@pytest.mark.parametrize("cross", [False, True])
def test_math_attention_matches_sdpa(cross):
    torch.manual_seed(0)
    attn = Attention(32, 4, kv_dim=24 if cross else None).eval()
    x = torch.randn(3, 7, 32)
    ctx = torch.randn(3, 5, 24) if cross else None
    key_mask = torch.ones(3, 5 if cross else 7, dtype=torch.bool)
    key_mask[1, -2:] = False
    attn.impl = "sdpa"
    ref = attn(x, context=ctx, key_mask=key_mask)
    attn.impl = "math"
    torch.testing.assert_close(attn(x, context=ctx, key_mask=key_mask), ref, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_text_encoding(model, tokenizer):
    model.eval()
    ids, mask = tokenizer(["a red circle on the left"], 24)
    padded = torch.cat([ids, torch.full((1, 3), tokenizer.pad_id)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)], dim=1)
    a = model.encode_text(ids, mask).hidden
    b = model.encode_text(padded, padded_mask).hidden[:, : ids.shape[1]]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
