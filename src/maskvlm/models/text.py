"""BERT-style text stack: embeddings + post-norm layers. The first layers form the text
encoder; the remaining layers, each with cross-attention to image tokens, form the text
cross-modality encoder (the ALBEF/MaskVLM split of one BERT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .layers import BertLayer, init_weights, run_blocks


@dataclass
class TextOutput:
    hidden: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L) bool, True = real token


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_position: int, type_vocab_size: int = 2,
                 dropout: float = 0.0, eps: float = 1e-12):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(max_position, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {length} tokens exceeds the {self.position_embeddings.num_embeddings} "
                             "position embeddings (model.max_position)")
        pos = torch.arange(length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class TextEncoder(nn.Module):
    """Unimodal text encoder: embeddings followed by ``layers`` BERT layers."""
    checkpointing = False  # per-block activation checkpointing (train.activation_checkpointing)


    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, intermediate: int,
                 max_position: int, type_vocab_size: int = 2, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, width, max_position, type_vocab_size, dropout)
        self.layer = nn.ModuleList(BertLayer(width, heads, intermediate, None, dropout, attn_dropout)
                                   for _ in range(layers))
        self.apply(init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        mask = attention_mask.bool()
        x = self.embeddings(input_ids)
        x = run_blocks(self, self.layer, x, key_mask=mask)
        return TextOutput(hidden=x, attention_mask=mask)


class TextCrossEncoder(nn.Module):
    """Text cross-modality encoder: BERT layers with cross-attention to image tokens."""
    checkpointing = False  # per-block activation checkpointing (train.activation_checkpointing)


    def __init__(self, width: int, layers: int, heads: int, intermediate: int, image_width: int,
                 dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(width, heads, intermediate, image_width, dropout, attn_dropout)
                                   for _ in range(layers))
        self.apply(init_weights)

    @property
    def shares_context(self) -> bool:
        """Whether ``project_context`` may be called outside ``forward``: not when the layers are
        sharded (FSDP gathers a layer's weights only for its own forward)."""
        from torch.distributed.fsdp import FSDPModule
        return not any(isinstance(layer, FSDPModule) for layer in self.layer)

    def project_context(self, image_hidden: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's cross-attention keys and values of ``image_hidden`` (B, Li, D_image): a list of
        (B, Li, 2 D) tensors that several ``forward`` calls over the same images can share."""
        return [layer.project_context(image_hidden) for layer in self.layer]

    def self_attend_first(self, text_hidden: torch.Tensor, text_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """The first layer's self-attention sub-layer over ``text_hidden`` (B, L, D): the part of the
        fusion that depends on the text alone. Pass it as ``text_hidden`` with ``self_attended=True``
        to fuse each caption with several images while computing it once. None when the layers are
        sharded (FSDP), whose weights exist only inside their own forward."""
        if not self.shares_context:
            return None
        return self.layer[0].attention(text_hidden, key_mask=text_mask)

    def forward(self, text_hidden: torch.Tensor, text_mask: torch.Tensor, image_hidden: Optional[torch.Tensor],
                image_mask: Optional[torch.Tensor] = None, image_index: Optional[torch.Tensor] = None,
                image_kv: Optional[list[torch.Tensor]] = None, output_positions: Optional[torch.Tensor] = None,
                self_attended: bool = False) -> torch.Tensor:
        """Text rows (Bt, L, D) attending to image rows: ``image_hidden`` (Bi, Li, D_image), or its
        ``project_context`` made beforehand as ``image_kv``. ``image_index`` (Bt,) names the image row
        of each text row (default: Bi = Bt, row i with row i); each image row is projected once, however
        many text rows attend to it. ``output_positions`` (Bt, Lq): return only those tokens'
        states (Bt, Lq, D), which the last layer then computes alone (e.g. [CLS] for ITM).
        ``self_attended``: ``text_hidden`` is ``self_attend_first`` of the text rows."""
        if image_kv is None and image_hidden is None:
            raise ValueError("the text cross-modality encoder needs image_hidden or image_kv")
        # without image_kv each layer projects image_hidden in its own forward
        per_block = None if image_kv is None else [{"context_kv": kv} for kv in image_kv]
        if self_attended:
            per_block = per_block or [{} for _ in self.layer]
            per_block[0] = {**per_block[0], "self_attended": True}
        if image_index is not None and image_mask is not None:
            image_mask = image_mask.index_select(0, image_index)
        return run_blocks(self, self.layer, text_hidden, per_block=per_block, last_positions=output_positions,
                          key_mask=text_mask, context=image_hidden, context_mask=image_mask,
                          context_index=image_index)
