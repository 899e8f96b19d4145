"""Byte accounting: floats at fp32, tied tensors once."""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.core.accounting import state_bytes
from tests.reporting._fixtures import BN_FP32, CONV_FP32, LINEAR_FP32, _model


def test_state_bytes_counts_floats_as_fp32_and_tied_tensors_once() -> None:
    model = _model()
    sizes = state_bytes(model)
    assert sizes["0.weight"] == 4 * 144 and sizes["1.num_batches_tracked"] == 8
    assert sum(sizes.values()) == CONV_FP32 + BN_FP32 + LINEAR_FP32
    assert state_bytes(model.to(torch.bfloat16))["0.weight"] == 4 * 144  # counted as fp32 whatever the dtype

    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert state_bytes(tied) == {"0.weight": 160}
