"""Transformer building blocks shared by every encoder: SDPA attention (self or cross),
pre-norm ViT blocks and post-norm BERT layers (parameter names follow the usual
ViT/BERT layouts so pretrained weights map onto them)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Initialisation for training from scratch: xavier-uniform linear weights (as MAE), truncated
    normal embeddings, zero biases, unit norms. BERT's std-0.02 linear init leaves a new
    cross-attention sub-layer (two small projections in series, then a post-norm residual) at about
    1% of the residual stream, and image-text matching then takes hundreds of steps to start."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def key_padding_to_attn_mask(key_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, Lk) bool, True = attend  ->  (B, 1, 1, Lk) mask broadcastable over heads and queries."""
    if key_mask is None:
        return None
    return key_mask[:, None, None, :].bool()


ATTENTION_IMPLS = ("auto", "sdpa", "math")


def run_blocks(owner: nn.Module, blocks, x: torch.Tensor, per_block: Optional[list] = None,
               last_positions: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """Apply ``blocks`` in order, each with ``kwargs`` and its own entry of ``per_block`` (a list of
    dicts, one per block); ``last_positions`` (B, Lq): the last block computes only those tokens
    (its ``query_positions``), for callers that read no others. With ``owner.checkpointing`` set
    (``train.activation_checkpointing``) and autograd on, each block keeps only its input and
    recomputes its activations in backward: less memory for one more forward pass per block."""
    from torch.utils.checkpoint import checkpoint

    ckpt = getattr(owner, "checkpointing", False) and torch.is_grad_enabled()
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        kw = kwargs if per_block is None else {**kwargs, **per_block[i]}
        if last_positions is not None and i == len(blocks) - 1:
            kw = {**kw, "query_positions": last_positions}
        x = checkpoint(block, x, use_reentrant=False, **kw) if ckpt else block(x, **kw)
    return x


def set_attention_impl(module: nn.Module, impl: str) -> None:
    """Switch every :class:`Attention` inside ``module`` to ``impl`` (model.attention)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    for m in module.modules():
        if isinstance(m, Attention):
            m.impl = impl


def encoder_stacks(module: nn.Module) -> list[nn.Module]:
    """The encoder stacks (ViT, text, cross-modality encoders) inside ``module``."""
    return [m for m in module.modules() if hasattr(m, "checkpointing")]


def set_activation_checkpointing(module: nn.Module, on: bool) -> int:
    """Switch per-block activation checkpointing in every encoder stack of ``module``; returns how
    many stacks were switched."""
    stacks = encoder_stacks(module)
    for m in stacks:
        m.checkpointing = on
    return len(stacks)


def compile_encoders(module: nn.Module, backend: str = "inductor", mode: Optional[str] = None) -> int:
    """``torch.compile`` each encoder stack in place (``nn.Module.compile``: parameter names and
    checkpoints are unchanged); returns how many. Heads and losses stay eager: they are small and
    their shapes vary more."""
    stacks = encoder_stacks(module)
    for m in stacks:
        m.compile(backend=backend, mode=mode)
    return len(stacks)


def math_attention(q, k, v, mask: Optional[torch.Tensor], dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out. On CPU in bf16 its backward is 2-4x faster than the
    SDPA kernels for short sequences (benchmarks/RESULTS.md); SDPA is used everywhere else."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout > 0:
        probs = F.dropout(probs, dropout)
    return probs @ v


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``.

    Self-attention uses one fused ``qkv`` projection; cross-attention (``kv_dim`` given)
    projects queries from ``x`` and keys/values from the context. ``impl``: "sdpa", "math" or
    "auto" (SDPA, except the explicit math path for bf16 on CPU)."""

    impl: str = "auto"
    # When True, the attention probabilities of the last call are kept in ``probs`` (written-out
    # attention, gradient retained when autograd is on): the hook Grad-CAM grounding uses.
    record: bool = False

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.is_cross = kv_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(kv_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None, kv: Optional[torch.Tensor] = None,
                context_index: Optional[torch.Tensor] = None, query: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-attention takes ``context`` (Bc, Lc, kv_dim), or its projection ``kv = self.kv(context)``
        made beforehand (shared by several calls); ``context_index`` (B,) picks the context row of each
        row of ``x`` (default: row i with row i), after the projection, so a context row that several
        queries share is projected once. Self-attention with ``query`` (B, Lq, D), some of ``x``'s
        tokens: only those attend (to all of ``x``), and the result is (B, Lq, D)."""
        if self.is_cross:
            if kv is None:
                if context is None:
                    raise ValueError("cross-attention needs a context tensor")
                kv = self.kv(context)
            q = self._split(self.q(x))
            if context_index is None:
                k, v = (self._split(t) for t in kv.chunk(2, dim=-1))
            else:
                # Put each context row's keys and values in the (heads, tokens, head_dim) layout the
                # attention products read, once per row, then gather the rows: the gathered k and v
                # are contiguous, so the products need no further copy per query row (gathering
                # the (B, Lc, 2D) projection first cost one more copy of every gathered row).
                # Rows are gathered as flat (Bc, H * Lc * head_dim) rows: index_select along another
                # dimension took up to 8x longer on CPU.
                bc, lc, _ = kv.shape
                kv = kv.view(bc, lc, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).contiguous()
                k, v = (t.view(bc, -1).index_select(0, context_index).view(-1, self.heads, lc, self.head_dim)
                        for t in kv.unbind(0))
        elif query is None:
            q, k, v = (self._split(t) for t in self.qkv(x).chunk(3, dim=-1))
        else:  # queries for the given tokens only; keys and values for all (the fused weight, split)
            d = self.proj.in_features
            w, b = self.qkv.weight, self.qkv.bias
            q = self._split(F.linear(query, w[:d], b[:d]))
            k, v = (self._split(t) for t in F.linear(x, w[d:], b[d:]).chunk(2, dim=-1))
        mask = key_padding_to_attn_mask(key_mask)
        dropout = self.dropout if self.training else 0.0
        use_math = self.impl == "math" or (self.impl == "auto" and q.device.type == "cpu"
                                           and q.dtype == torch.bfloat16)
        if self.record:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            self.probs = scores.softmax(dim=-1)
            if self.probs.requires_grad:
                self.probs.retain_grad()
            out = self.probs @ v
        elif use_math:
            out = math_attention(q, k, v, mask, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


def take_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens, (B, Lq) positions -> (B, Lq, D) the tokens at those positions."""
    return x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class PreNormBlock(nn.Module):
    """ViT block (pre-norm); with ``cross_dim`` it gains a cross-attention sub-layer."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cross_dim: Optional[int] = None,
                 dropout: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout=dropout)
        self.has_cross = cross_dim is not None
        if self.has_cross:
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = Attention(dim, heads, kv_dim=cross_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                query_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``query_positions`` (B, Lq): compute the block's output at those tokens only (they still
        attend to all tokens), e.g. in the last block when only some outputs are used."""
        if query_positions is None:
            x = x + self.attn(self.norm1(x), key_mask=key_mask)
        else:
            normed = self.norm1(x)
            x = take_positions(x, query_positions) + self.attn(
                normed, key_mask=key_mask, query=take_positions(normed, query_positions))
        if self.has_cross:
            x = x + self.cross_attn(self.norm_cross(x), context=context, key_mask=context_mask)
        return x + self.mlp(self.norm2(x))


class BertSubLayer(nn.Module):
    """Attention followed by BERT's post-norm residual: LayerNorm(x + dropout(attn(x)))."""

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int], dropout: float, attn_dropout: float,
                 eps: float):
        super().__init__()
        self.attn = Attention(dim, heads, kv_dim=kv_dim, dropout=attn_dropout)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, key_mask=None, context=None, kv=None, context_index=None, query_positions=None):
        query = None if query_positions is None else take_positions(x, query_positions)
        out = self.attn(x, context=context, key_mask=key_mask, kv=kv, context_index=context_index, query=query)
        return self.norm((x if query is None else query) + self.drop(out))


class BertLayer(nn.Module):
    """BERT encoder layer (post-norm): self-attention, optional cross-attention, feed-forward."""

    def __init__(self, dim: int, heads: int, intermediate: int, cross_dim: Optional[int] = None,
                 dropout: float = 0.0, attn_dropout: float = 0.0, eps: float = 1e-12):
        super().__init__()
        self.attention = BertSubLayer(dim, heads, None, dropout, attn_dropout, eps)
        self.crossattention = (BertSubLayer(dim, heads, cross_dim, dropout, attn_dropout, eps)
                               if cross_dim is not None else None)
        self.intermediate = nn.Linear(dim, intermediate)
        self.output = nn.Linear(intermediate, dim)
        self.output_drop = nn.Dropout(dropout)
        self.output_norm = nn.LayerNorm(dim, eps=eps)

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """The cross-attention keys and values of ``context`` (B, Lc, 2 D), to pass as ``context_kv``."""
        return self.crossattention.attn.kv(context)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                context_kv: Optional[torch.Tensor] = None, context_index: Optional[torch.Tensor] = None,
                query_positions: Optional[torch.Tensor] = None, self_attended: bool = False) -> torch.Tensor:
        """``query_positions`` (B, Lq): the layer's output at those tokens only (B, Lq, D); they still
        attend to every token, so the result equals the full output taken at those positions.
        ``self_attended``: ``x`` is already ``self.attention(x)`` of the layer's input (computed once
        for rows that several calls share, e.g. a caption re-ranked against many images)."""
        if not self_attended:
            x = self.attention(x, key_mask=key_mask, query_positions=query_positions)
        elif query_positions is not None:
            x = take_positions(x, query_positions)
        if self.crossattention is not None:
            x = self.crossattention(x, key_mask=context_mask, context=context, kv=context_kv,
                                    context_index=context_index)
        return self.output_norm(x + self.output_drop(self.output(F.gelu(self.intermediate(x)))))
