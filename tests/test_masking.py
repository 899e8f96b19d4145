"""Tests for lightning_compress.masking: choosing keep-masks, expanding unit masks, applying them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

from lightning_compress import masking

SIZES = [(10, 8), (6, 4, 3, 3), (50,)]


def _all_kept(scores: list[Tensor]) -> list[Tensor]:
    return [torch.ones_like(s, dtype=torch.bool) for s in scores]


def _kept(masks: list[Tensor]) -> int:
    return sum(int(m.sum()) for m in masks)


# ---------------------------------------------------------------------------- keep_masks
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_global_reaches_exact_count_and_keeps_top_scores(sparsity: float) -> None:
    scores = [torch.rand(s) + 1.0 for s in SIZES]
    scores[0][0, 0] = 10.0  # every layer's best score is above any global cut
    scores[1][0, 0, 0, 0] = 10.0
    scores[2][0] = 10.0
    masks = masking.keep_masks(scores, _all_kept(scores), sparsity)
    total = sum(s.numel() for s in scores)
    n_keep = total - round(sparsity * total)
    assert _kept(masks) == n_keep
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert all(m.dtype == torch.bool for m in masks)
    flat = torch.cat([s.flatten() for s in scores])
    cutoff = flat.sort(descending=True).values[n_keep - 1]
    for m, s in zip(masks, scores):
        assert torch.equal(m, s >= cutoff)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_layer_scope_prunes_each_tensor_on_its_own(sparsity: float) -> None:
    scores = [torch.rand(SIZES[0]), torch.rand(SIZES[1]) + 100.0, torch.rand(SIZES[2]) - 100.0]
    masks = masking.keep_masks(scores, _all_kept(scores), sparsity, scope="layer")
    for m, s in zip(masks, scores):
        n_keep = s.numel() - round(sparsity * s.numel())
        assert int(m.sum()) == n_keep
        cutoff = s.flatten().sort(descending=True).values[n_keep - 1]
        assert torch.equal(m, s >= cutoff)


def test_unknown_scope_raises() -> None:
    scores = [torch.rand(4)]
    with pytest.raises(ValueError, match="`scope` must be one of .*, got 'model'"):
        masking.keep_masks(scores, _all_kept(scores), 0.5, scope="model")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruned_stays_pruned_even_with_high_score(scope: str) -> None:
    scores = [torch.rand(20), torch.rand(30)]
    current = _all_kept(scores)
    current[0][:5] = False
    current[1][10:20] = False
    scores[0][:5] = 1e6  # the pruned entries now look most important
    scores[1][10:20] = float("inf")
    masks = masking.keep_masks(scores, current, 0.5, scope=scope)
    for m, c in zip(masks, current):
        assert not (m & ~c).any()  # masks only shrink
    assert _kept(masks) == 25
    # a schedule target below the current sparsity prunes nothing more
    again = masking.keep_masks(scores, masks, 0.2, scope=scope)
    for m, prev in zip(again, masks):
        assert torch.equal(m, prev)


@pytest.mark.parametrize(("min_keep", "floor"), [(0.0, 1), (0.25, 3), (0.5, 5)])
def test_floor_keeps_layer_whose_scores_are_all_lowest(min_keep: float, floor: int) -> None:
    low = torch.arange(10, dtype=torch.float32) / 100.0  # 0 .. 0.09, all below the other layer
    high = torch.rand(90) + 1.0
    current = [torch.ones(10, dtype=torch.bool), torch.ones(90, dtype=torch.bool)]
    masks = masking.keep_masks([low, high], current, 0.5, min_keep=min_keep)
    assert masking.floor_count(10, min_keep) == floor == max(1, math.ceil(min_keep * 10))
    assert int(masks[0].sum()) == floor
    assert torch.equal(masks[0], low >= low[10 - floor])  # its best-scored entries
    assert _kept(masks) == 50  # the floor displaces the weakest entries of the other layer: count still exact
    assert torch.equal(masks[1], high >= high.sort(descending=True).values[50 - floor - 1])


def test_floor_never_resurrects_pruned_entries() -> None:
    scores = [torch.rand(10), torch.rand(90) + 1.0]
    current = [torch.zeros(10, dtype=torch.bool), torch.ones(90, dtype=torch.bool)]
    current[0][3] = True  # one left, floor asks for 5
    masks = masking.keep_masks(scores, current, 0.5, min_keep=0.5)
    assert torch.equal(masks[0], current[0])
    current[0][3] = False  # none left
    masks = masking.keep_masks(scores, current, 0.5, min_keep=0.5)
    assert not masks[0].any()


def test_floor_count() -> None:
    assert masking.floor_count(100, 0.0) == 1
    assert masking.floor_count(100, 0.011) == 2
    assert masking.floor_count(7, 0.5) == 4


def test_nan_and_inf_scores() -> None:
    s = torch.tensor([0.5, float("nan"), 2.0, float("inf"), float("-inf"), 1.0, float("nan"), 3.0])
    masks = masking.keep_masks([s], _all_kept([s]), 0.5)
    # NaN counts as score 0: below every positive score, above -inf; +inf is the best score
    assert torch.equal(masks[0], torch.tensor([False, False, True, True, False, True, False, True]))
    masks = masking.keep_masks([s], _all_kept([s]), 0.25)
    assert torch.equal(masks[0], torch.tensor([True, True, True, True, False, True, False, True]))
    all_nan = torch.full((6,), float("nan"))
    masks = masking.keep_masks([all_nan, torch.rand(6)], _all_kept([all_nan, all_nan]), 0.5)
    assert _kept(masks) == 6 and masks[0].any()


def test_ties_are_deterministic() -> None:
    scores = [torch.ones(6), torch.ones(6), torch.ones(9)]
    first = masking.keep_masks(scores, _all_kept(scores), 0.5)
    for _ in range(3):
        again = masking.keep_masks([s.clone() for s in scores], _all_kept(scores), 0.5)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert _kept(first) == 21 - round(0.5 * 21)


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([10], [torch.arange(10) < 7]),
        # the floor takes one entry of the second layer: its first one; the rest, by position, from the first layer
        ([6, 6], [torch.arange(6) < 5, torch.arange(6) < 1]),
    ],
    ids=["one_layer", "two_layers_with_floor"],
)
def test_ties_are_broken_by_position(sizes: list[int], expected: list[Tensor]) -> None:
    """Equal scores: the earlier position is kept, as `keep_masks` documents (stable sort), floors included."""
    scores = [torch.ones(n) for n in sizes]
    sparsity = 0.3 if len(sizes) == 1 else 0.5
    masks = masking.keep_masks(scores, _all_kept(scores), sparsity)
    for m, e in zip(masks, expected, strict=True):
        assert torch.equal(m, e)


# ---------------------------------------------------------------------------- threshold_masks
def test_threshold_masks_drop_flagged_entries() -> None:
    score = torch.arange(8, dtype=torch.float32)
    current = torch.ones(8, dtype=torch.bool)
    current[7] = False
    flag = torch.tensor([True, False, True, False, False, False, False, False])
    (mask,) = masking.threshold_masks([flag], [current], [score])
    assert torch.equal(mask, torch.tensor([False, True, False, True, True, True, True, False]))


def test_threshold_masks_floor_keeps_best_unpruned_entries() -> None:
    score = torch.tensor([0.3, 0.9, 0.1, 0.8, 0.5, 0.2, 0.7, 5.0, 0.6, 0.4])
    current = torch.ones(10, dtype=torch.bool)
    current[7] = False  # the best score, but already pruned
    flag = torch.ones(10, dtype=torch.bool)  # everything below threshold
    (mask,) = masking.threshold_masks([flag], [current], [score], min_keep=0.3)
    assert int(mask.sum()) == 3
    assert torch.equal(mask, torch.isin(torch.arange(10), torch.tensor([1, 3, 6])))
    (mask,) = masking.threshold_masks([flag], [current], [score], min_keep=0.0)
    assert torch.equal(mask, torch.arange(10) == 1)  # at least one survives


def test_threshold_masks_keep_shape_of_conv_weight() -> None:
    score = torch.rand(4, 2, 3, 3)
    current = torch.ones_like(score, dtype=torch.bool)
    flag = score < 0.5
    (mask,) = masking.threshold_masks([flag.flatten()], [current], [score], min_keep=0.0)
    assert mask.shape == score.shape
    assert torch.equal(mask, ~flag)


def test_sparsity_of() -> None:
    masks = [torch.tensor([True, False, False, True]), torch.zeros(2, 3, dtype=torch.bool)]
    assert masking.sparsity_of(masks) == pytest.approx(1 - 2 / 10)
    assert masking.sparsity_of([torch.ones(5, dtype=torch.bool)]) == 0.0


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
    masks = masking.expand_unit_masks(model, {"0": keep, "2": torch.tensor([False, True])})
    assert set(masks) == {"0.weight", "0.bias", "2.weight"}
    assert torch.equal(masks["0.weight"], keep.view(4, 1).expand(4, 3))
    assert torch.equal(masks["0.bias"], keep)
    assert torch.equal(masks["2.weight"], torch.tensor([[False] * 4, [True] * 4]))


def test_expand_unit_masks_conv_bn_flatten_linear() -> None:
    model = _ConvNet()
    keep = torch.tensor([True, False, True])
    group = _Group(prunable=True, followers=["bn"], consumers=[("fc", 16)])
    masks = masking.expand_unit_masks(model, {"conv": keep}, {"conv": group})
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
        masking.ParameterMasks(model, masks).apply()
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
    masks = masking.expand_unit_masks(model, {"conv": keep}, {"conv": not_prunable})
    assert set(masks) == {"conv.weight", "conv.bias"}
    # a consumer whose input starts at column 4 (e.g. after a concatenation), one column per unit
    masks = masking.expand_unit_masks(model, {"conv": keep}, {"conv": _Group(prunable=True, consumers=[("fc", 1, 4)])})
    expected = torch.ones(5, 48, dtype=torch.bool)
    expected[:, 4] = False
    assert torch.equal(masks["fc.weight"], expected)


def test_expand_unit_masks_combines_masks_on_shared_parameters() -> None:
    model = _ConvNet()
    masks = masking.expand_unit_masks(
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
    (alive,) = masking.unit_keep_from_weights([w])
    assert torch.equal(alive, torch.tensor([True, False, True]))
    (rows,) = masking.unit_masks_to_rows([w], [alive])
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
    pm = masking.ParameterMasks(layer, masks)
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
    pm = masking.ParameterMasks(layer, masks)
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
    masking.ParameterMasks(layer, masks).apply_to_optimizer_state(optimizer)
    for n, p in layer.named_parameters():
        for key in buffers:
            old = state[n][key]
            assert old[~masks[n]].abs().sum() > 0
            assert torch.equal(optimizer.state[p][key], torch.where(masks[n], old, torch.zeros_like(old)))
        if "step" in state[n]:
            assert torch.equal(optimizer.state[p]["step"], state[n]["step"])
    # a pruned weight then stays exactly zero through further steps (zero grad and no stale momentum)
    pm = masking.ParameterMasks(layer, masks)
    pm.apply()
    optimizer.zero_grad()
    layer(torch.randn(5, 4)).square().sum().backward()
    pm.apply_to_grads()
    optimizer.step()
    assert not layer.weight.detach()[~masks["weight"]].any()


def test_parameter_masks_unknown_name_raises() -> None:
    layer, masks = _linear_masks()
    with pytest.raises(ValueError, match=r"does not have: \['fc.weight'\]"):
        masking.ParameterMasks(layer, {**masks, "fc.weight": torch.ones(3, 4, dtype=torch.bool)})


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_top_k_equals_a_stable_descending_sort(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 5, (n,), generator=generator).float()  # many ties
    scores[::7] = float("-inf")
    scores[3::11] = float("inf")
    for k in range(0, n + 2, max(1, n // 13)):
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.argsort(scores, descending=True, stable=True)[:k]] = True
        assert torch.equal(masking.top_k(scores, k), expected), k
