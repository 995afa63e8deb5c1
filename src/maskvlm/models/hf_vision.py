"""Image-encoder initialisation from local ViT / DeiT weights: a Hugging Face ``ViTModel``
folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) or a timm-style
state dict file (``.safetensors``, or ``.pth``/``.bin`` read with ``weights_only=True``).

Hugging Face keeps query/key/value apart; our blocks (like timm's) use one fused ``qkv``
projection, so they are concatenated. Position embeddings are resized bicubically when the
patch grid differs (another resolution); a DeiT distillation token is dropped (and reported)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .hf_text import InitReport, read_hf_folder
from .io import read_weights
from .vit import interpolate_pos_embed

_HF_LAYER = {  # HF ViT names inside encoder.layer.N -> ours inside blocks.N
    "layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}


def hf_vit_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face ViTModel / DeiTModel state -> our VisionTransformer names (timm-like)."""
    state = {re.sub(r"^(vit|deit)\.", "", k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key):
        used.add(key)
        return state[key]

    simple = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    for src, dst in simple.items():
        if src in state:
            out[dst] = take(src)
    if "embeddings.distillation_token" in state:  # DeiT distilled: drop the token and its position
        take("embeddings.distillation_token")
        out["pos_embed"] = torch.cat([out["pos_embed"][:, :1], out["pos_embed"][:, 2:]], dim=1)
    i = 0
    while f"encoder.layer.{i}.attention.attention.query.weight" in state:
        hf, ours = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{ours}attn.qkv.{part}"] = torch.cat(
                [take(f"{hf}attention.attention.{p}.{part}") for p in ("query", "key", "value")])
            for src, dst in _HF_LAYER.items():
                out[f"{ours}{dst}.{part}"] = take(f"{hf}{src}.{part}")
        i += 1
    return out, sorted(k for k in state if k not in used)


def timm_vit_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm VisionTransformer state dict -> ours (the names match except the patch projection)."""
    state = {re.sub(r"^(module\.|model\.|visual\.)", "", k): v for k, v in state.items()}
    out, ignored = {}, []
    for k, v in state.items():
        if k.startswith("patch_embed.proj."):
            out["patch_embed." + k[len("patch_embed.proj."):]] = v
        elif k in ("cls_token", "pos_embed", "norm.weight", "norm.bias") or k.startswith("blocks."):
            out[k] = v
        else:
            ignored.append(k)  # head, fc_norm, dist_token, ...
    if "dist_token" in state and "pos_embed" in out:
        out["pos_embed"] = torch.cat([out["pos_embed"][:, :1], out["pos_embed"][:, 2:]], dim=1)
    return out, sorted(ignored)


def read_vision_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """(our-named state, ignored source keys, format) from a HF folder or a timm state-dict file."""
    path = Path(path)
    if path.is_dir():
        _, state = read_hf_folder(path)
        mapped, ignored = hf_vit_to_ours(state)
        return mapped, ignored, "hf"
    if not path.is_file():
        raise FileNotFoundError(f"image weights not found: {path} (a Hugging Face ViT folder or a timm state dict)")
    if path.suffix == ".safetensors":
        state = read_weights(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot be loaded safely ({e})") from None
        for key in ("model", "state_dict", "module"):  # training checkpoints nest the weights
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    if any(k.startswith(("embeddings.", "encoder.layer.", "vit.", "deit.")) for k in state):
        mapped, ignored = hf_vit_to_ours(state)
        return mapped, ignored, "hf"
    mapped, ignored = timm_vit_to_ours(state)
    return mapped, ignored, "timm"


def init_vision(encoder: torch.nn.Module, path: str | Path, prefix: str = "") -> InitReport:
    """Copy ViT weights into ``encoder`` (our VisionTransformer) in place; position embeddings
    are resized to its grid. ``prefix`` only names the keys in the report."""
    mapped, ignored, kind = read_vision_weights(path)
    ours = encoder.state_dict()
    report = InitReport(f"{path} ({kind} format)", ignored=list(ignored))
    theirs_patch = mapped["patch_embed.weight"].shape[-1] if "patch_embed.weight" in mapped else None
    if theirs_patch is not None and theirs_patch != ours["patch_embed.weight"].shape[-1]:
        raise ValueError(f"{path}: patch size {mapped['patch_embed.weight'].shape[-1]} but the model uses "
                         f"{ours['patch_embed.weight'].shape[-1]} (model.patch_size)")
    def adjust(name, tensor, target):
        if name == "pos_embed" and tensor.shape != target.shape:
            side = int(round((target.shape[1] - 1) ** 0.5))
            return interpolate_pos_embed(tensor.float(), (side, side))
        return tensor
    report.copy_weights(mapped, ours, adjust, str(path), "check model.vision_* sizes", prefix)
    report.new = sorted(prefix + k for k in ours if prefix + k not in set(report.loaded))
    return report
