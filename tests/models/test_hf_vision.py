"""Image initialisation from ViT weights in Hugging Face and timm formats: outputs equal
``transformers``' ViTModel on the same weights."""

import pytest
import torch
from safetensors.torch import load_file

from maskvlm.models.hf_vision import init_vision, read_vision_weights
from maskvlm.models.vit import VisionTransformer

transformers = pytest.importorskip("transformers")


def _hf_vit(tmp_path, image_size=32, patch=8, width=48, layers=2, heads=3):
    cfg = transformers.ViTConfig(image_size=image_size, patch_size=patch, hidden_size=width, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=4 * width, hidden_act="gelu",
                                 layer_norm_eps=1e-6, qkv_bias=True)
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg, add_pooling_layer=True).eval()
    with torch.no_grad():  # non-trivial values everywhere (HF initialises some of these to zero)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    return model, folder


def _ours(image_size=32, patch=8, width=48, layers=2, heads=3):
    vit = VisionTransformer(image_size, patch, width, layers, heads)
    for m in vit.modules():
        if hasattr(m, "impl"):
            m.impl = "math"
    return vit.eval()


def test_hf_vit_folder_gives_equal_outputs(tmp_path):
    hf, folder = _hf_vit(tmp_path)
    ours = _ours()
    report = init_vision(ours, folder)
    assert report.new == [] and any(k.startswith("pooler") for k in report.ignored)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = hf(pixel_values=images).last_hidden_state
        mine = ours(images).hidden
    assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()


def test_timm_state_dict_gives_equal_outputs(tmp_path):
    hf, folder = _hf_vit(tmp_path)
    s = load_file(str(folder / "model.safetensors"))  # the on-disk (Hub) names
    timm = {"cls_token": s["embeddings.cls_token"], "pos_embed": s["embeddings.position_embeddings"],
            "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": s["layernorm.weight"], "norm.bias": s["layernorm.bias"],
            "head.weight": torch.zeros(10, 48), "head.bias": torch.zeros(10)}
    for i in range(2):
        a = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            timm[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [s[f"{a}attention.attention.{n}.{part}"] for n in ("query", "key", "value")])
            for src, dst in (("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"),
                             ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2")):
                timm[f"blocks.{i}.{dst}.{part}"] = s[f"{a}{src}.{part}"]
    path = tmp_path / "vit_timm.pth"
    torch.save({"model": timm}, path)  # nested the way training checkpoints often are
    assert read_vision_weights(path)[2] == "timm"
    ours = _ours()
    report = init_vision(ours, path)
    assert report.new == [] and report.ignored == ["head.bias", "head.weight"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(images).hidden, hf(pixel_values=images).last_hidden_state, atol=1e-4)


def test_position_embeddings_are_resized_to_another_grid_and_patch_size_must_match(tmp_path):
    _, folder = _hf_vit(tmp_path)
    big = _ours(image_size=64)  # grid 8 instead of 4
    init_vision(big, folder)
    source = read_vision_weights(folder)[0]["pos_embed"]
    assert big.pos_embed.shape == (1, 65, 48)
    assert torch.equal(big.pos_embed[:, :1], source[:, :1])
    with pytest.raises(ValueError, match="patch size 8 but the model uses 16"):
        init_vision(_ours(image_size=64, patch=16), folder)


def test_pretraining_from_a_vit_folder_takes_its_sizes_and_weights(synthetic_dir, tmp_path):
    from maskvlm.pipeline import pretrain
    from maskvlm.train.checkpoint import list_checkpoints
    from tests.conftest import micro_config
    _, folder = _hf_vit(tmp_path, width=48, layers=2, heads=3)
    cfg = micro_config(f"model.image_init={folder}", "model.image_cross_heads=3",
                       f"data.train={synthetic_dir / 'train.json'}", "data.test=null",
                       f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.lr=0",
                       "train.min_lr=0")
    pretrain(cfg)
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    saved = load_file(str(ckpt / "model.safetensors"))
    source = read_vision_weights(folder)[0]
    assert torch.equal(saved["model.visual_encoder.blocks.1.attn.qkv.weight"], source["blocks.1.attn.qkv.weight"])
