"""Attention the TorchScript exporter can trace with a dynamic sequence length. No Lightning.

``torch.nn.functional.multi_head_attention_forward`` turns the sequence length into a Python constant while it is
traced (its ``view(tgt_len, bsz * num_heads, head_dim)``), so an exported ``nn.MultiheadAttention`` only runs at the
example's length. :func:`make_traceable` swaps, in the export copy only, each ``nn.MultiheadAttention`` it can take
for :class:`TraceableAttention`: the same parameters under the same names (``in_proj_weight``, ``in_proj_bias``,
``out_proj``), the same arithmetic, reshapes that keep every size symbolic. Modules it cannot take (separate k/v
sizes, ``bias_k`` / ``add_zero_attn``) are left as they are; the export's probe at another length then says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TraceableAttention(nn.Module):
    """Inference-only self- and cross-attention with ``nn.MultiheadAttention``'s parameters (no dropout)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        self._qkv_same_embed_dim = True
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        del need_weights, average_attn_weights  # weights are not returned (None), as with need_weights=False
        unbatched, same, memory = query.dim() == 2, query is key and key is value, key is value
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (L, B, E) from here, like multi_head_attention_forward
        head = self.embed_dim // self.num_heads
        if same:  # one MatMul on the whole in_proj_weight (a chunk() of its output would
            # be folded by the exporter into three MatMuls on three slices of the weight)
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, self.num_heads, head))
            q, k, v = (qkv.select(2, i).permute(1, 2, 0, 3) for i in range(3))  # (B, H, L, D)
        elif memory:  # cross-attention on a memory: still one MatMul on the whole weight, over the query's
            # and the memory's positions together (the unused thirds are the price of its integer kernel)
            length = query.shape[0]
            both = F.linear(torch.cat([query, key]), self.in_proj_weight, self.in_proj_bias)  # (L + S, B, 3E)
            both = both.unflatten(-1, (3, self.num_heads, head))
            q = both[:length].select(2, 0).permute(1, 2, 0, 3)  # (B, H, L, D)
            k, v = (both[length:].select(2, i).permute(1, 2, 0, 3) for i in (1, 2))  # (B, H, S, D)
        else:
            w = self.in_proj_weight.chunk(3)
            b = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            projected = (F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2]))
            q, k, v = (t.unflatten(-1, (self.num_heads, head)).permute(1, 2, 0, 3) for t in projected)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(head)  # (B, H, L, S)
        if is_causal and attn_mask is None:
            size = scores.shape[-1]
            attn_mask = torch.ones(size, size, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            per_head = attn_mask.dim() == 3  # (B * H, L, S)
            scores = _masked(scores, attn_mask.unflatten(0, (-1, self.num_heads)) if per_head else attn_mask)
        if key_padding_mask is not None:
            scores = _masked(scores, key_padding_mask[:, None, None, :])
        out = torch.matmul(scores.softmax(-1), v)  # (B, H, L, D)
        out = self.out_proj(out.permute(2, 0, 1, 3).flatten(2))  # (L, B, E)
        if unbatched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None


def _masked(scores: Tensor, mask: Tensor) -> Tensor:
    """A boolean mask (True: not attended) becomes -inf, a float mask is added, as in ``nn.MultiheadAttention``."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


def make_traceable(model: nn.Module) -> list[str]:
    """Swap each ``nn.MultiheadAttention`` of ``model`` that :class:`TraceableAttention` can take; returns the names
    of those it left alone."""
    left = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.MultiheadAttention):
            continue
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            left.append(name)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, TraceableAttention(module))
    return left
