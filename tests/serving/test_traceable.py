"""TraceableAttention computes what nn.MultiheadAttention computes: self-attention, cross-attention on a memory
(query and memory of different lengths, one projection over both) and distinct key / value, with padding masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.serving._traceable import TraceableAttention


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "memory", "distinct"])
def test_the_same_outputs_as_multihead_attention(kind: str, batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    length, memory_length, batch = 5, 9, 3

    def seq(n: int) -> torch.Tensor:
        return torch.randn(batch, n, 16) if batch_first else torch.randn(n, batch, 16)

    query = seq(length)
    key = query if kind == "self" else seq(memory_length)
    value = key if kind in ("self", "memory") else seq(key.shape[1] if batch_first else key.shape[0])
    padding = torch.zeros(batch, key.shape[1] if batch_first else key.shape[0], dtype=torch.bool)
    padding[0, -2:] = True  # the first sequence's last two positions are padding
    with torch.no_grad():
        want = mha(query, key, value, key_padding_mask=padding, need_weights=False)[0]
        got = TraceableAttention(mha)(query, key, value, key_padding_mask=padding)[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
