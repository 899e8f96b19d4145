"""PrunedMultiheadAttention computes what nn.MultiheadAttention computes, under every mask form it accepts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.structure.attention import PrunedMultiheadAttention


def twin(mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
    pruned = PrunedMultiheadAttention.like(mha, mha.num_heads)
    pruned.load_state_dict(mha.state_dict(), strict=True)  # same keys, same shapes with every head kept
    return pruned


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "padding", "causal"])
def test_same_outputs_as_multihead_attention(batch_first: bool, need_weights: bool, masks: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    pruned = twin(mha).eval()
    q = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    kv = torch.randn(3, 6, 16) if batch_first else torch.randn(6, 3, 16)
    kwargs: dict = {"need_weights": need_weights}
    if masks == "bool":
        kwargs["attn_mask"] = torch.rand(5, 6) > 0.7
    elif masks == "float":
        kwargs["attn_mask"] = torch.randn(3 * 4, 5, 6)
    elif masks == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [True] + [False] * 5])
    elif masks == "causal":
        kv = q
        kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(5), is_causal=True)
    with torch.no_grad():
        expected, expected_weights = mha(q, kv, kv, **kwargs)
        got, got_weights = pruned(q, kv, kv, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_weights, expected_weights, atol=1e-5, rtol=1e-5)
    else:
        assert got_weights is None


def test_unbatched_input_and_per_head_weights() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = mha(x, x, x, average_attn_weights=False)
        got = twin(mha).eval()(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


def test_fewer_heads_than_the_embedding_holds() -> None:
    attention = PrunedMultiheadAttention(32, 3, 8, batch_first=True)
    out, weights = attention(torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 32) and weights.shape == (2, 5, 5)
    assert attention.in_proj_weight.shape == (72, 32) and attention.out_proj.in_features == 24
    assert not attention._qkv_same_embed_dim  # keeps nn.TransformerEncoderLayer's fused kernel away


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="`num_heads` must be a positive int, got 0"):
        PrunedMultiheadAttention(16, 0, 4)
