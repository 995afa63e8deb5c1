"""Model sizes taken from the folders named by ``model.text_init`` / ``model.image_init``, applied
while the configuration is built (so ``--print-config`` shows them and validation sees them)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import Config, ConfigError

log = logging.getLogger("maskvlm")


def apply_init_sizes(config: Config) -> None:
    if config.model.text_init:
        apply_text_architecture(config)
    if config.model.image_init:
        apply_vision_architecture(config)


def apply_text_architecture(config: Config) -> None:
    """Set the text sizes (width, heads, feed-forward, positions) from ``model.text_init``'s config.json."""
    from .hf_text import read_hf_config, text_architecture

    m = config.model
    try:
        arch = text_architecture(read_hf_config(m.text_init))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.text_init={m.text_init}: {e}") from None
    if m.text_layers + m.cross_layers > arch["_layers"]:
        raise ConfigError(f"model.text_layers + model.cross_layers = {m.text_layers + m.cross_layers}, but "
                          f"{m.text_init} has {arch['_layers']} layers")
    changed = []
    for key in ("text_width", "text_heads", "text_intermediate", "max_position", "type_vocab_size"):
        if getattr(m, key) != arch[key]:
            changed.append(f"model.{key}={arch[key]}")
            setattr(m, key, arch[key])
    if changed:
        log.info("from %s/config.json: %s", m.text_init, ", ".join(changed))


def apply_vision_architecture(config: Config) -> None:
    """Set the ViT sizes from ``model.image_init`` when it is a Hugging Face folder (config.json);
    a timm state dict carries no sizes, so the model's must already match."""
    m = config.model
    path = Path(m.image_init)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return
    try:
        hf = json.loads((path / "config.json").read_text())
        sizes = {"vision_width": hf["hidden_size"], "vision_heads": hf["num_attention_heads"],
                 "vision_layers": hf["num_hidden_layers"], "patch_size": hf["patch_size"],
                 "vision_mlp_ratio": hf["intermediate_size"] / hf["hidden_size"]}
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.image_init={path}: config.json lacks or mangles {e}") from None
    changed = [f"model.{k}={v}" for k, v in sizes.items() if getattr(m, k) != v]
    for k, v in sizes.items():
        setattr(m, k, v)
    if changed:
        log.info("from %s/config.json: %s", path, ", ".join(changed))
