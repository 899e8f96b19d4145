"""Attention with fewer heads: what ``nn.MultiheadAttention`` becomes when heads are removed. Pure PyTorch.

``nn.MultiheadAttention`` derives ``head_dim = embed_dim // num_heads`` and projects to ``embed_dim`` inside, so it
cannot hold 3 of 4 heads of 16 dimensions next to a 64-wide residual stream. :class:`PrunedMultiheadAttention`
computes exactly what ``nn.MultiheadAttention`` computes (same call signature, same ``state_dict`` keys:
``in_proj_weight`` / ``in_proj_bias`` / ``out_proj.*``), with ``num_heads * head_dim`` allowed below ``embed_dim``.
It sets ``_qkv_same_embed_dim = False`` so that ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` never
route it to their fused kernels (which assume ``num_heads * head_dim == embed_dim``).

The units of an attention module are the rows of ``in_proj_weight``: ``[q; k; v]``, three *parts* of
``num_heads * head_dim`` rows each; head ``h`` is rows ``h*head_dim ... (h+1)*head_dim - 1`` of every part, and the
same columns of ``out_proj.weight``.
"""

from __future__ import annotations

import math
from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` each over an ``embed_dim``-wide input."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim = self.vdim = embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self._qkv_same_embed_dim = False  # keeps nn.Transformer*'s fused fast path away (see the module docstring)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = NonDynamicallyQuantizableLinear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def like(cls, module: AttentionModule, num_heads: int) -> PrunedMultiheadAttention:
        """An instance shaped like ``module`` (a (pruned) multi-head attention) with ``num_heads`` heads, on the
        same device and dtype."""
        embed_dim, _, head_dim = attention_layout(module)
        new = cls(embed_dim, num_heads, head_dim, bias=module.in_proj_bias is not None, dropout=module.dropout,
                  batch_first=module.batch_first)
        new.train(module.training)
        return new.to(module.in_proj_weight.device, module.in_proj_weight.dtype)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        if self.batch_first and not unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, batch, _ = query.shape  # (L, B, E) from here on
        source = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)

        def split(x: Tensor, w: Tensor, b: Tensor | None, n: int) -> Tensor:
            return F.linear(x, w, b).view(n, batch, heads, head_dim).permute(1, 2, 0, 3)  # (B, H, n, hd)

        q, k, v = split(query, w_q, b_q, length), split(key, w_k, b_k, source), split(value, w_v, b_v, source)
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, batch, heads, length, source, q.dtype, q.device)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
            probs = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = probs.mean(dim=1) if average_attn_weights else probs
            out = F.dropout(probs, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim))  # (L, B, E)
        if self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out, weights = out.squeeze(1), weights.squeeze(0) if weights is not None else None
        return out, weights


ATTENTION_TYPES = (nn.MultiheadAttention, PrunedMultiheadAttention)
AttentionModule: TypeAlias = nn.MultiheadAttention | PrunedMultiheadAttention  # isinstance(m, ATTENTION_TYPES)


def attention_layout(module: AttentionModule) -> tuple[int, int, int]:
    """``(embed_dim, num_heads, head_dim)`` of a multi-head attention module."""
    return module.embed_dim, module.num_heads, module.head_dim


def unsupported(module: AttentionModule) -> str:
    """Why the heads of this attention module cannot be removed ("" if they can)."""
    if isinstance(module, PrunedMultiheadAttention):
        return ""
    if not module._qkv_same_embed_dim:
        return "has separate q/k/v projection weights (kdim / vdim differ from embed_dim)"
    if module.bias_k is not None or module.add_zero_attn:
        return "uses add_bias_kv / add_zero_attn"
    return ""


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    batch: int,
    heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """One float mask broadcastable to (B, H, L, S), as nn.MultiheadAttention combines its masks (bool: True means
    "may not attend"; float: added to the scores)."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(batch, heads, length, source) if mask.dim() == 3 else mask  # (B*H, L, S) or (L, S)
    elif is_causal:
        mask = additive(torch.ones(length, source, dtype=torch.bool, device=device).triu(1))
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask
