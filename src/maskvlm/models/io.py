"""Model folders on disk: ``config.yaml`` + ``model.safetensors`` (+ ``tokenizer.json``).
Used by ``save_pretrained``/``from_pretrained`` and by training checkpoints, whose weight
file holds the whole task (keys ``model.*`` plus objective state such as teachers).

Every folder maskvlm writes also holds ``checksums.json``: the size and SHA-256 of each file,
taken once the files are complete. Weights (and a checkpoint's trainer state) are checked against
it when they are read, so a file damaged on disk after it was written (a cut copy, a storage
fault, a bit flip) is an error that names it, never weights silently loaded wrong. The text files
(config, tokenizer) are not held to it: a hand edit there is deliberate, and their readers report
one they cannot parse."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CHECKSUM_FILE = "checksums.json"


def file_sha256(path: Path, chunk: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """Record the size and SHA-256 of every file in ``directory`` in its ``checksums.json``."""
    directory = Path(directory)
    sums = {}
    for name in sorted(os.listdir(directory)):
        path = directory / name
        if name != CHECKSUM_FILE and path.is_file():
            sums[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    with open(directory / CHECKSUM_FILE, "w") as f:
        json.dump(sums, f, indent=1)


def _recorded(directory: Path) -> Optional[dict]:
    """The folder's ``checksums.json`` (None for a folder written without one: older maskvlm, or
    another program); ValueError when it cannot be read."""
    path = Path(directory) / CHECKSUM_FILE
    if not path.is_file():
        return None
    with open(path) as f:
        sums = json.load(f)  # JSONDecodeError is a ValueError
    if not isinstance(sums, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                             for v in sums.values()):
        raise ValueError("not a mapping of file name -> bytes, sha256")
    return sums


# files found whole in this process, by (path, inode, size, modification time): a resume checks the
# checkpoint when choosing it and again when loading it, and hashes it once
_VERIFIED: set[tuple] = set()


def file_damage(path: Path, sums: Optional[dict] = None) -> Optional[str]:
    """What is wrong with ``path`` (None: nothing found): compared with what its folder's
    ``checksums.json`` recorded when it was written, or, where nothing was recorded, checked by
    structure: the safetensors header must cover the file, and torch's zip archive must pass its CRCs."""
    path = Path(path)
    try:
        sums = _recorded(path.parent) if sums is None else sums
    except ValueError as e:
        return f"{CHECKSUM_FILE} cannot be read ({e})"
    if not path.is_file():
        return f"{path.name} is missing"
    want = (sums or {}).get(path.name)
    if want is None:
        return _structure_damage(path)
    stat = path.stat()
    if stat.st_size != want["bytes"]:
        return f"{path.name} holds {stat.st_size} bytes, but {want['bytes']} were written"
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, want["sha256"])
    if key not in _VERIFIED:
        if file_sha256(path) != want["sha256"]:
            return f"{path.name} is not the file that was written (its SHA-256 differs from the recorded one)"
        _VERIFIED.add(key)
    return None


def folder_damage(directory: Path, names: tuple[str, ...]) -> Optional[str]:
    """What is wrong with the files ``names`` of a folder (None: they are whole); see ``file_damage``."""
    directory = Path(directory)
    try:
        sums = _recorded(directory)
    except ValueError as e:
        return f"{CHECKSUM_FILE} cannot be read ({e})"
    for name in names:
        problem = file_damage(directory / name, sums)
        if problem:
            return problem
    return None


def _structure_damage(path: Path) -> Optional[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as e:  # SafetensorError: the header is cut or does not describe the file
            return f"{path.name} is not a whole safetensors file ({e})"
    elif path.suffix == ".pt":
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # not torch's zip format: left to torch.load to judge
                return None
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{path.name} is not a whole archive ({e})"
        if bad is not None:
            return f"{path.name}: its member {bad} fails its CRC check"
    return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking it against its folder's ``checksums.json``;
    a damaged or foreign file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    problem = file_damage(path)
    if problem:
        raise ValueError(f"{path.parent}: damaged: {problem}")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (cut or foreign file), OSError
        raise ValueError(f"{path}: cannot be read as safetensors weights ({e})") from None


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


_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def out_of_space(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is a full disk or an exceeded quota.
    ``torch.save`` reports one as a RuntimeError (``unexpected pos ...``) raised from the file's
    OSError, and safetensors as a SafetensorError whose text carries the OS error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in _FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def save_state(state: dict, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk surfaces as the file's OSError
    (given a path, torch's own writer loses it)."""
    with open(path, "wb") as f:
        torch.save(state, f)


def write_model_folder(directory: Path, module: nn.Module, config, tokenizer=None,
                       state: Optional[dict] = None, checksums: bool = True) -> Path:
    """Write config, weights (and tokenizer) of ``module`` into ``directory`` (created); ``state``:
    the weights to write instead of ``module``'s own (e.g. gathered from FSDP shards). ``checksums``:
    record the files in ``checksums.json`` (a caller that adds files records them itself after)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / CONFIG_FILE, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    save_file(unique_state_dict(module) if state is None else state, str(directory / MODEL_FILE),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_FILE)
    if checksums:
        write_checksums(directory)
    return directory


def read_config(directory: Path):
    from ..config import ConfigError, config_from_dict
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        hint = ("; it holds a Hugging Face config.json: a BERT/RoBERTa or ViT/DeiT folder initialises a maskvlm "
                "model through model.text_init / model.image_init") if (Path(directory) / "config.json").is_file() \
            else ""
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (expected a checkpoint or pretrained-model "
                                f"folder){hint}")
    with open(path, encoding="utf-8") as f:
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
    state = read_weights(path)
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state
