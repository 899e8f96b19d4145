"""Costs: positions per example of each layer kind (conv output positions, tokens, attention in-proj, lookups),
MACs of the delivered weights, fixed bytes and aliases. Random tensors: shape / counting tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_compress.adaptive.costs import aliases, batch_size, delivered_macs, fixed_bytes, model_macs, positions
from lightning_compress.quantization.calibration import feed


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)  # (B, 4, 6, 6): 36 positions
        self.proj = nn.Linear(6, 8)  # applied to (B, 4 * 6, 6): 24 tokens
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # 24 query / key / value tokens
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.conv(x)).reshape(x.shape[0], 24, 6)
        h = self.proj(h)
        h = self.attn(h, h, h, need_weights=False)[0]
        return h.mean(1) + self.emb(torch.zeros(x.shape[0], dtype=torch.long))


def test_positions_per_example_by_layer_kind() -> None:
    model = Mixed()
    layers = {"conv": model.conv, "proj": model.proj, "attn": model.attn, "emb": model.emb}
    where = positions(model, layers, torch.randn(5, 1, 6, 6), feed)
    assert where == {"conv": 36.0, "proj": 24.0, "attn": 24.0, "emb": 0.0}
    weights = {"conv": model.conv.weight, "proj": model.proj.weight, "attn": model.attn.in_proj_weight}
    dense = 36 * 36 + 24 * 48 + 24 * 192
    assert delivered_macs(weights, where, 7) == dense + 7
    with torch.no_grad():
        model.proj.weight[:4] = 0
    assert delivered_macs(weights, where, 0) == dense - 24 * 24
    attention = 2 * 24 * 24 * 8 + 24 * 8 * 8  # q k^T and attn v over 24 tokens, then out_proj
    assert model_macs(model, torch.randn(5, 1, 6, 6), feed) == dense + attention  # the fast path counted too


def test_fixed_bytes_and_aliases() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=True))
    model[1].weight = model[0].weight
    keys = {"0": "0.weight"}
    assert aliases(model, keys) == {"0": 1}
    assert fixed_bytes(model, keys) == 10 * 4  # the bias only: both keys of the tied weight are planned
    assert batch_size({"ids": torch.zeros(3, 7)}) == 3 and batch_size((torch.zeros(2, 1), 0)) == 2
