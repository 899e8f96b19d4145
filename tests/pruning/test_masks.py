"""Tests for lightning_compress.pruning.masks: expanding unit masks to parameters, applying masks in place."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

from lightning_compress.pruning.masks import (
    ParameterMasks,
    expand_unit_masks,
    unit_keep_from_weights,
    unit_masks_to_rows,
)


# ---------------------------------------------------------------------------- expand_unit_masks
class _ConvNet(nn.Module):
    """conv (2 -> 3 channels, 4x4) -> BN -> flatten -> linear (48 -> 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@dataclass
class _Group:
    prunable: bool
    followers: list[str] = field(default_factory=list)
    consumers: list[tuple] = field(default_factory=list)


def test_expand_unit_masks_rows_and_bias_only() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    keep = torch.tensor([True, False, True, False])
    masks = expand_unit_masks(model, {"0": keep, "2": torch.tensor([False, True])})
    assert set(masks) == {"0.weight", "0.bias", "2.weight"}
    assert torch.equal(masks["0.weight"], keep.view(4, 1).expand(4, 3))
    assert torch.equal(masks["0.bias"], keep)
    assert torch.equal(masks["2.weight"], torch.tensor([[False] * 4, [True] * 4]))


def test_expand_unit_masks_conv_bn_flatten_linear() -> None:
    model = _ConvNet()
    keep = torch.tensor([True, False, True])
    group = _Group(prunable=True, followers=["bn"], consumers=[("fc", 16)])
    masks = expand_unit_masks(model, {"conv": keep}, {"conv": group})
    assert set(masks) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight"}
    conv_w = torch.ones(3, 2, 3, 3, dtype=torch.bool)
    conv_w[1] = False
    assert torch.equal(masks["conv.weight"], conv_w)
    for name in ("conv.bias", "bn.weight", "bn.bias"):
        assert torch.equal(masks[name], keep), name
    fc_w = torch.ones(5, 48, dtype=torch.bool)
    fc_w[:, 16:32] = False  # channel 1's 4x4 = 16 flattened features
    assert torch.equal(masks["fc.weight"], fc_w)

    # and the masks do what they are for: channel 1 is gone from the network's function
    model.eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        ParameterMasks(model, masks).apply()
        x = torch.randn(2, 2, 4, 4)
        assert torch.equal(model.bn(model.conv(x))[:, 1], torch.zeros(2, 4, 4))
        ref = model.fc(torch.relu(model.bn(model.conv(x))).flatten(1))
        feats = torch.relu(model.bn(model.conv(x)))
        feats[:, 1] = 123.0  # whatever reaches fc from the pruned channel is ignored
        torch.testing.assert_close(model.fc(feats.flatten(1)), ref)


def test_expand_unit_masks_group_not_prunable_and_offset_consumer() -> None:
    model = _ConvNet()
    keep = torch.tensor([False, True, True])
    not_prunable = _Group(prunable=False, followers=["bn"], consumers=[("fc", 16)])
    masks = expand_unit_masks(model, {"conv": keep}, {"conv": not_prunable})
    assert set(masks) == {"conv.weight", "conv.bias"}
    # a consumer whose input starts at column 4 (e.g. after a concatenation), one column per unit
    masks = expand_unit_masks(model, {"conv": keep}, {"conv": _Group(prunable=True, consumers=[("fc", 1, 4)])})
    expected = torch.ones(5, 48, dtype=torch.bool)
    expected[:, 4] = False
    assert torch.equal(masks["fc.weight"], expected)


def test_expand_unit_masks_combines_masks_on_shared_parameters() -> None:
    model = _ConvNet()
    masks = expand_unit_masks(
        model,
        {"conv": torch.tensor([True, False, True]), "fc": torch.tensor([True, True, False, True, True])},
        {"conv": _Group(prunable=True, consumers=[("fc", 16)])},
    )
    expected = torch.ones(5, 48, dtype=torch.bool)
    expected[:, 16:32] = False
    expected[2] = False
    assert torch.equal(masks["fc.weight"], expected)


def test_unit_helpers() -> None:
    w = torch.randn(3, 2, 2)
    w[1] = 0.0
    (alive,) = unit_keep_from_weights([w])
    assert torch.equal(alive, torch.tensor([True, False, True]))
    (rows,) = unit_masks_to_rows([w], [alive])
    expected = torch.ones(3, 2, 2, dtype=torch.bool)
    expected[1] = False
    assert torch.equal(rows, expected)


# ---------------------------------------------------------------------------- ParameterMasks
def _linear_masks() -> tuple[nn.Linear, dict[str, Tensor]]:
    layer = nn.Linear(4, 3)
    weight_keep = torch.rand(3, 4) > 0.5
    weight_keep[0, 0], weight_keep[0, 1] = True, False
    bias_keep = torch.tensor([True, False, True])
    return layer, {"weight": weight_keep, "bias": bias_keep}


def test_parameter_masks_apply_and_grads() -> None:
    layer, masks = _linear_masks()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    pm = ParameterMasks(layer, masks)
    pm.apply()
    for n, p in layer.named_parameters():
        assert torch.equal(p.detach(), torch.where(masks[n], before[n], torch.zeros_like(before[n])))
    layer(torch.randn(5, 4)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    assert all(g[~masks[n]].abs().sum() > 0 for n, g in grads.items())  # a real test: pruned grads were non-zero
    pm.apply_to_grads()
    for n, p in layer.named_parameters():
        assert torch.equal(p.grad, torch.where(masks[n], grads[n], torch.zeros_like(grads[n])))
    assert {n: m.device.type for n, m in pm.as_dict().items()} == {"weight": "cpu", "bias": "cpu"}
    assert all(torch.equal(pm.as_dict()[n], masks[n]) for n in masks)


def test_parameter_masks_apply_to_grads_skips_missing_grads() -> None:
    layer, masks = _linear_masks()
    pm = ParameterMasks(layer, masks)
    pm.apply_to_grads()  # no grads yet: nothing to do, no error
    assert layer.weight.grad is None


@pytest.mark.parametrize(
    ("make_optimizer", "buffers"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ["momentum_buffer"]),
        (lambda p: torch.optim.Adam(p, lr=0.1), ["exp_avg", "exp_avg_sq"]),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_parameter_masks_apply_to_optimizer_state(make_optimizer, buffers: list[str]) -> None:
    layer, masks = _linear_masks()
    optimizer = make_optimizer(layer.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        layer(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in layer.named_parameters()}
    ParameterMasks(layer, masks).apply_to_optimizer_state(optimizer)
    for n, p in layer.named_parameters():
        for key in buffers:
            old = state[n][key]
            assert old[~masks[n]].abs().sum() > 0
            assert torch.equal(optimizer.state[p][key], torch.where(masks[n], old, torch.zeros_like(old)))
        if "step" in state[n]:
            assert torch.equal(optimizer.state[p]["step"], state[n]["step"])
    # a pruned weight then stays exactly zero through further steps (zero grad and no stale momentum)
    pm = ParameterMasks(layer, masks)
    pm.apply()
    optimizer.zero_grad()
    layer(torch.randn(5, 4)).square().sum().backward()
    pm.apply_to_grads()
    optimizer.step()
    assert not layer.weight.detach()[~masks["weight"]].any()


def test_parameter_masks_unknown_name_raises() -> None:
    layer, masks = _linear_masks()
    with pytest.raises(ValueError, match=r"does not have: \['fc.weight'\]"):
        ParameterMasks(layer, {**masks, "fc.weight": torch.ones(3, 4, dtype=torch.bool)})
