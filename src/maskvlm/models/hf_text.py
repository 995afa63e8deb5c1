"""Text initialisation from a local Hugging Face BERT-family folder (BERT, MiniLM, RoBERTa).

The folder holds ``config.json``, the weights (``model.safetensors``, or ``pytorch_model.bin``
read with ``torch.load(weights_only=True)``) and ``vocab.txt`` / ``tokenizer.json``. Its first
``model.text_layers`` layers become the text encoder and the next ``model.cross_layers`` the
text cross-modality encoder, whose cross-attention sub-layers stay newly initialised (the
ALBEF/MaskVLM split). ``InitReport`` says what was loaded, what is new and what was ignored."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io import read_weights, tied_names

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class InitReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # our parameter names filled from the folder
    new: list[str] = field(default_factory=list)  # our parameters left at their initialisation
    ignored: list[str] = field(default_factory=list)  # folder tensors we did not use

    def summary(self) -> str:
        def short(names):
            return ", ".join(names[:6]) + (f" ... (+{len(names) - 6})" if len(names) > 6 else "")
        return (f"{self.source}: loaded {len(self.loaded)} tensors; new {len(self.new)} [{short(self.new)}]; "
                f"ignored {len(self.ignored)} [{short(self.ignored)}]")

    @torch.no_grad()
    def copy_weights(self, mapped: dict, ours: dict, adjust, origin: str, hint: str, prefix: str = "") -> None:
        """Copy the ``mapped`` tensors into ``ours`` (a state dict) in place. Names ``ours`` lacks
        are reported ignored; ``adjust(name, tensor, target)`` reconciles a known format difference
        (e.g. fewer positions); any other shape difference is an error naming the tensor."""
        for name, tensor in mapped.items():
            if name not in ours:
                self.ignored.append(name)
                continue
            target = ours[name]
            tensor = adjust(name, tensor, target)
            if tensor.shape != target.shape:
                raise ValueError(f"{origin}: {name} has shape {tuple(tensor.shape)} in the "
                                 f"{'folder' if Path(origin).is_dir() else 'file'} but {tuple(target.shape)} in "
                                 f"the model ({hint})")
            target.copy_(tensor.to(target.dtype))
            self.loaded.append(prefix + name)


def read_hf_config(folder: str | Path) -> dict:
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict) of a Hugging Face model folder, without unpickling code."""
    folder = Path(folder)
    config = read_hf_config(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                return config, read_weights(path)
            try:
                return config, torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{path}: cannot be loaded safely ({e})") from None
    raise FileNotFoundError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading ``bert.`` / ``roberta.`` (task-head checkpoints nest the encoder under it)."""
    out = {}
    for k, v in state.items():
        out[re.sub(r"^(bert|roberta)\.", "", k)] = v
    return out


def text_architecture(hf_config: dict) -> dict:
    """Our ``model`` keys that must match the folder (width, heads, intermediate, vocabulary, positions)."""
    kind = hf_config.get("model_type", "bert")
    if kind not in ("bert", "roberta", "xlm-roberta"):
        raise ValueError(f"model_type {kind!r}: text initialisation supports BERT-family (bert, roberta) folders")
    offset = 2 if kind != "bert" else 0  # RoBERTa positions start after the padding index
    return {"text_width": hf_config["hidden_size"], "text_heads": hf_config["num_attention_heads"],
            "text_intermediate": hf_config["intermediate_size"], "vocab_size": hf_config["vocab_size"],
            "max_position": hf_config["max_position_embeddings"] - offset,
            "type_vocab_size": hf_config.get("type_vocab_size", 2), "_layers": hf_config["num_hidden_layers"],
            "_position_offset": offset}


_LAYER_MAP = {  # HF name inside encoder.layer.N -> ours inside a BertLayer
    "attention.output.dense": "attention.attn.proj",
    "attention.output.LayerNorm": "attention.norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}


def bert_to_ours(state: dict[str, torch.Tensor], text_layers: int, cross_layers: int,
                 position_offset: int = 0, prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a BERT-family state dict onto our text encoder (layers < text_layers) and text
    cross-modality encoder (the next cross_layers). Returns (our state, HF keys not used)."""
    state = _strip_prefix(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    emb = f"{prefix}text_encoder.embeddings."
    for name in ("word_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        if f"embeddings.{name}" in state:
            out[emb + name] = take(f"embeddings.{name}")
    if "embeddings.position_embeddings.weight" in state:
        out[emb + "position_embeddings.weight"] = take("embeddings.position_embeddings.weight")[position_offset:]
    for i in range(text_layers + cross_layers):
        hf = f"encoder.layer.{i}."
        if f"{hf}attention.self.query.weight" not in state:
            break
        ours = (f"{prefix}text_encoder.layer.{i}." if i < text_layers
                else f"{prefix}text_cross_encoder.layer.{i - text_layers}.")
        for part in ("weight", "bias"):
            out[f"{ours}attention.attn.qkv.{part}"] = torch.cat(
                [take(f"{hf}attention.self.{p}.{part}") for p in ("query", "key", "value")])
            for src, dst in _LAYER_MAP.items():
                out[f"{ours}{dst}.{part}"] = take(f"{hf}{src}.{part}")
    head = {"cls.predictions.transform.dense": "mlm_head.dense",
            "cls.predictions.transform.LayerNorm": "mlm_head.LayerNorm",
            "lm_head.dense": "mlm_head.dense", "lm_head.layer_norm": "mlm_head.LayerNorm"}
    for src, dst in head.items():  # the pre-trained MLM transform, when the folder has it
        for part in ("weight", "bias"):
            if f"{src}.{part}" in state:
                out[f"{prefix}{dst}.{part}"] = take(f"{src}.{part}")
    for bias in ("cls.predictions.bias", "lm_head.bias"):
        if bias in state:
            out[f"{prefix}mlm_head.decoder.bias"] = take(bias)
    ignored = sorted(k for k in state if k not in used)
    return out, ignored


def init_text_from_hf(model: torch.nn.Module, folder: str | Path, text_layers: int, cross_layers: int) -> InitReport:
    """Copy the folder's weights into ``model`` (a MaskVLM) in place and report what happened."""
    hf_config, state = read_hf_folder(folder)
    arch = text_architecture(hf_config)
    mapped, ignored = bert_to_ours(state, text_layers, cross_layers, arch["_position_offset"])
    ours = model.state_dict()
    report = InitReport(str(folder), ignored=ignored)
    def adjust(name, tensor, target):
        if name.endswith("position_embeddings.weight") and tensor.shape[0] > target.shape[0]:
            return tensor[:target.shape[0]]  # our model keeps fewer positions
        if name.endswith(("word_embeddings.weight", "decoder.bias")) and tensor.shape[0] < target.shape[0]:
            grown = target.clone()  # tokens the folder's embeddings lack keep their new rows
            grown[:tensor.shape[0]] = tensor
            return grown
        return tensor
    report.copy_weights(mapped, ours, adjust, str(folder), "check model.text_* against config.json")
    tied = tied_names(model)  # the MLM decoder's weight is the word embeddings, loaded under that name
    text_keys = [k for k in ours if k.startswith(("text_encoder.", "text_cross_encoder.", "mlm_head."))
                 and k not in tied]
    report.new = sorted(k for k in text_keys if k not in set(report.loaded))
    return report
