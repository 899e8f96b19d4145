"""Tests for lightning_compress.pruning.selection: choosing keep-masks (top-k, floors, thresholds)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_compress.pruning import selection

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
    masks = selection.keep_masks(scores, _all_kept(scores), sparsity)
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
    masks = selection.keep_masks(scores, _all_kept(scores), sparsity, scope="layer")
    for m, s in zip(masks, scores):
        n_keep = s.numel() - round(sparsity * s.numel())
        assert int(m.sum()) == n_keep
        cutoff = s.flatten().sort(descending=True).values[n_keep - 1]
        assert torch.equal(m, s >= cutoff)


def test_unknown_scope_raises() -> None:
    scores = [torch.rand(4)]
    with pytest.raises(ValueError, match=r"`scope` must be one of .*, got 'model'"):
        selection.keep_masks(scores, _all_kept(scores), 0.5, scope="model")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruned_stays_pruned_even_with_high_score(scope: str) -> None:
    scores = [torch.rand(20), torch.rand(30)]
    current = _all_kept(scores)
    current[0][:5] = False
    current[1][10:20] = False
    scores[0][:5] = 1e6  # the pruned entries now look most important
    scores[1][10:20] = float("inf")
    masks = selection.keep_masks(scores, current, 0.5, scope=scope)
    for m, c in zip(masks, current):
        assert not (m & ~c).any()  # masks only shrink
    assert _kept(masks) == 25
    # a schedule target below the current sparsity prunes nothing more
    again = selection.keep_masks(scores, masks, 0.2, scope=scope)
    for m, prev in zip(again, masks):
        assert torch.equal(m, prev)


@pytest.mark.parametrize(("min_keep", "floor"), [(0.0, 1), (0.25, 3), (0.5, 5)])
def test_floor_keeps_layer_whose_scores_are_all_lowest(min_keep: float, floor: int) -> None:
    low = torch.arange(10, dtype=torch.float32) / 100.0  # 0 .. 0.09, all below the other layer
    high = torch.rand(90) + 1.0
    current = [torch.ones(10, dtype=torch.bool), torch.ones(90, dtype=torch.bool)]
    masks = selection.keep_masks([low, high], current, 0.5, min_keep=min_keep)
    assert selection.floor_count(10, min_keep) == floor == max(1, math.ceil(min_keep * 10))
    assert int(masks[0].sum()) == floor
    assert torch.equal(masks[0], low >= low[10 - floor])  # its best-scored entries
    assert _kept(masks) == 50  # the floor displaces the weakest entries of the other layer: count still exact
    assert torch.equal(masks[1], high >= high.sort(descending=True).values[50 - floor - 1])


def test_floor_never_resurrects_pruned_entries() -> None:
    scores = [torch.rand(10), torch.rand(90) + 1.0]
    current = [torch.zeros(10, dtype=torch.bool), torch.ones(90, dtype=torch.bool)]
    current[0][3] = True  # one left, floor asks for 5
    masks = selection.keep_masks(scores, current, 0.5, min_keep=0.5)
    assert torch.equal(masks[0], current[0])
    current[0][3] = False  # none left
    masks = selection.keep_masks(scores, current, 0.5, min_keep=0.5)
    assert not masks[0].any()


def test_floor_count() -> None:
    assert selection.floor_count(100, 0.0) == 1
    assert selection.floor_count(100, 0.011) == 2
    assert selection.floor_count(7, 0.5) == 4


def test_nan_and_inf_scores() -> None:
    s = torch.tensor([0.5, float("nan"), 2.0, float("inf"), float("-inf"), 1.0, float("nan"), 3.0])
    masks = selection.keep_masks([s], _all_kept([s]), 0.5)
    # NaN counts as score 0: below every positive score, above -inf; +inf is the best score
    assert torch.equal(masks[0], torch.tensor([False, False, True, True, False, True, False, True]))
    masks = selection.keep_masks([s], _all_kept([s]), 0.25)
    assert torch.equal(masks[0], torch.tensor([True, True, True, True, False, True, False, True]))
    all_nan = torch.full((6,), float("nan"))
    masks = selection.keep_masks([all_nan, torch.rand(6)], _all_kept([all_nan, all_nan]), 0.5)
    assert _kept(masks) == 6 and masks[0].any()


def test_ties_are_deterministic() -> None:
    scores = [torch.ones(6), torch.ones(6), torch.ones(9)]
    first = selection.keep_masks(scores, _all_kept(scores), 0.5)
    for _ in range(3):
        again = selection.keep_masks([s.clone() for s in scores], _all_kept(scores), 0.5)
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
    masks = selection.keep_masks(scores, _all_kept(scores), sparsity)
    for m, e in zip(masks, expected, strict=True):
        assert torch.equal(m, e)


# ---------------------------------------------------------------------------- threshold_masks
def test_threshold_masks_drop_flagged_entries() -> None:
    score = torch.arange(8, dtype=torch.float32)
    current = torch.ones(8, dtype=torch.bool)
    current[7] = False
    flag = torch.tensor([True, False, True, False, False, False, False, False])
    (mask,) = selection.threshold_masks([flag], [current], [score])
    assert torch.equal(mask, torch.tensor([False, True, False, True, True, True, True, False]))


def test_threshold_masks_floor_keeps_best_unpruned_entries() -> None:
    score = torch.tensor([0.3, 0.9, 0.1, 0.8, 0.5, 0.2, 0.7, 5.0, 0.6, 0.4])
    current = torch.ones(10, dtype=torch.bool)
    current[7] = False  # the best score, but already pruned
    flag = torch.ones(10, dtype=torch.bool)  # everything below threshold
    (mask,) = selection.threshold_masks([flag], [current], [score], min_keep=0.3)
    assert int(mask.sum()) == 3
    assert torch.equal(mask, torch.isin(torch.arange(10), torch.tensor([1, 3, 6])))
    (mask,) = selection.threshold_masks([flag], [current], [score], min_keep=0.0)
    assert torch.equal(mask, torch.arange(10) == 1)  # at least one survives


def test_threshold_masks_keep_shape_of_conv_weight() -> None:
    score = torch.rand(4, 2, 3, 3)
    current = torch.ones_like(score, dtype=torch.bool)
    flag = score < 0.5
    (mask,) = selection.threshold_masks([flag.flatten()], [current], [score], min_keep=0.0)
    assert mask.shape == score.shape
    assert torch.equal(mask, ~flag)


def test_sparsity_of() -> None:
    masks = [torch.tensor([True, False, False, True]), torch.zeros(2, 3, dtype=torch.bool)]
    assert selection.sparsity_of(masks) == pytest.approx(1 - 2 / 10)
    assert selection.sparsity_of([torch.ones(5, dtype=torch.bool)]) == 0.0


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_top_k_equals_a_stable_descending_sort(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 5, (n,), generator=generator).float()  # many ties
    scores[::7] = float("-inf")
    scores[3::11] = float("inf")
    for k in range(0, n + 2, max(1, n // 13)):
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.argsort(scores, descending=True, stable=True)[:k]] = True
        assert torch.equal(selection.top_k(scores, k), expected), k


def test_layer_sparsity_gives_each_tensor_its_own_target_and_keeps_what_is_pruned() -> None:
    torch.manual_seed(0)
    scores = [torch.rand(s) for s in SIZES]
    current = _all_kept(scores)
    current[0].view(-1)[:30] = False  # 30 of 80 already pruned: more than the 0.25 asked of this tensor
    masks = selection.keep_masks(scores, current, 0.99, scope="global", layer_sparsity=[0.25, 0.5, 0.0])
    assert [int(m.sum()) for m in masks] == [50, 108, 50]  # the 0.99 and the global scope are not read
    assert not masks[0].view(-1)[:30].any()
    kept = scores[1].flatten()[masks[1].flatten()]
    assert float(kept.min()) >= float(scores[1].flatten()[~masks[1].flatten()].max())  # the best half stays


def test_layer_sparsity_needs_one_target_per_tensor() -> None:
    scores = [torch.rand(s) for s in SIZES]
    with pytest.raises(ValueError, match=r"`layer_sparsity` needs one target per tensor \(3\), got 2"):
        selection.keep_masks(scores, _all_kept(scores), 0.5, layer_sparsity=[0.1, 0.2])
