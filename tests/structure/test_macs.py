"""count_macs measures a forward pass; estimated_macs predicts it from unit masks without running anything."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.demos.models import SmallCNN
from lightning_compress.structure.compaction import compact
from lightning_compress.structure.dependency import find_unit_groups
from lightning_compress.structure.macs import block_macs, count_macs, estimated_macs, macs_per_example
from tests.structure.test_transformers import EncoderClassifier, heads_mask


def test_count_macs_of_a_linear_and_a_conv() -> None:
    assert count_macs(nn.Linear(8, 4), torch.randn(3, 8)) == 3 * 8 * 4
    assert count_macs(nn.Conv2d(2, 5, 3, padding=1), torch.randn(1, 2, 6, 6)) == 6 * 6 * 5 * 2 * 9


def test_estimate_matches_the_measured_compacted_cnn() -> None:
    model, x = SmallCNN(image_size=8, channels=[4, 6], hidden=8), torch.randn(2, 1, 8, 8)
    groups = find_unit_groups(model, x)
    assert estimated_macs(groups, {}) == pytest.approx(count_macs(model, x), rel=1e-9)
    masks = {"net.0": torch.tensor([1, 0, 1, 0], dtype=torch.bool), "net.4": torch.arange(6) < 2}
    assert estimated_macs(groups, masks) == pytest.approx(count_macs(compact(model, masks, x).model, x), rel=1e-9)


def test_estimate_matches_the_measured_compacted_transformer() -> None:
    model, x = EncoderClassifier(), torch.randint(0, 30, (2, 7))
    groups = find_unit_groups(model, x)
    torch.testing.assert_close(estimated_macs(groups, {}), float(count_macs(model, x)))
    masks = {"encoder.layers.0.self_attn": heads_mask(groups["encoder.layers.0.self_attn"], [1]),
             "encoder.layers.1.linear1": torch.arange(48) < 12}
    torch.testing.assert_close(estimated_macs(groups, masks), float(count_macs(compact(model, masks, x).model, x)))


def test_a_channel_at_high_resolution_costs_more() -> None:
    class TwoScales(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.high, self.low, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.high(x))
            return self.fc(torch.relu(self.low(nn.functional.max_pool2d(h, 4))).mean((2, 3)))

    groups = find_unit_groups(TwoScales(), torch.randn(1, 1, 16, 16))
    high, low = block_macs(groups, [["high"], ["low"]], {})
    assert high == 16 * 16 * 9 + 4 * 4 * 4 * 9  # its own outputs, and the next conv's inputs at 4x4
    assert low == 4 * 4 * 4 * 9 + 2  # its own outputs, and one fc column


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_macs_per_example_do_not_depend_on_the_example_batch(batch: int) -> None:
    model = SmallCNN(image_size=8, channels=[4, 8], hidden=16)
    assert macs_per_example(model, torch.zeros(batch, 1, 8, 8)) == count_macs(model, torch.zeros(1, 1, 8, 8))
    assert macs_per_example(nn.Linear(8, 4), {"input": torch.zeros(batch, 8)}) == 8 * 4
