"""Model folders on disk: ``config.yaml`` + ``model.safetensors`` (+ ``tokenizer.json``).
Used by ``save_pretrained``/``from_pretrained`` and by training checkpoints, whose weight
file holds the whole task (keys ``model.*`` plus objective state such as teachers)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def tied_names(module: nn.Module) -> dict[str, str]:
    """Second names of tied tensors (e.g. the MLM decoder tied to the word embeddings) -> the first
    name of the same tensor. Nothing is copied."""
    first: dict = {}
    tied: dict[str, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def unique_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied tensors (safetensors stores each tensor once)."""
    tied = tied_names(module)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in module.state_dict().items()
            if name not in tied}


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True):
    """Load ``state`` into ``module``; tied names absent from ``state`` are not reported missing.
    With ``strict``, any other missing or unexpected key is an error that lists them; a tensor of
    another shape is always an error naming the tensors and both shapes."""
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (this model: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"{source} does not match this architecture: {len(wrong)} tensors have another shape: "
                         f"{'; '.join(wrong[:10])}{' ...' if len(wrong) > 10 else ''}")
    result = module.load_state_dict(state, strict=False)
    tied = tied_names(module)
    missing = [k for k in result.missing_keys if k not in tied]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise ValueError(f"{source} does not match this architecture: missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
    return missing, unexpected


def write_model_folder(directory: Path, module: nn.Module, config, tokenizer=None,
                       state: Optional[dict] = None) -> Path:
    """Write config, weights (and tokenizer) of ``module`` into ``directory`` (created); ``state``:
    the weights to write instead of ``module``'s own (e.g. gathered from FSDP shards)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / CONFIG_FILE, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    save_file(unique_state_dict(module) if state is None else state, str(directory / MODEL_FILE),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_FILE)
    return directory


def read_config(directory: Path):
    from ..config import ConfigError, config_from_dict
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (expected a checkpoint or pretrained-model folder)")
    with open(path) as f:
        try:
            return config_from_dict(yaml.safe_load(f))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model's weights from a model folder or a training checkpoint (``model.`` prefix removed,
    objective state such as teachers and queues left out)."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MODEL_FILE}")
    state = load_file(str(path))
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state
