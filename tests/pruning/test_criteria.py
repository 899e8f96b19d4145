"""Tests for lightning_compress.pruning.criteria on small hand-made tensors whose statistics are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_compress.pruning import criteria as scoring
from lightning_compress.pruning.statistics import GradientStatistics

# One 2x2 Linear weight, two optimizer steps.
W = torch.tensor([[0.5, -2.0], [3.0, 1.0]])
G1 = torch.tensor([[1.0, -1.0], [2.0, 2.0]])
G2 = torch.tensor([[3.0, 3.0], [4.0, -4.0]])
# per weight: mean = (G1 + G2) / 2, population std = |G1 - G2| / 2
MEAN = torch.tensor([[2.0, 1.0], [3.0, -1.0]])
STD = torch.tensor([[1.0, 2.0], [1.0, 3.0]])
# per unit, gradient RMS per step: row 0: 1 then 3, row 1: 2 then 4  -> mean (2, 3), std (1, 1)
RMS_MEAN = torch.tensor([2.0, 3.0])
RMS_STD = torch.tensor([1.0, 1.0])
# per unit Taylor term sum_j w_ij g_ij: row 0: 2.5 then -4.5, row 1: 8 then 8  -> E[t^2] = (13.25, 64)
TAYLOR_SECOND_MOMENT = torch.tensor([13.25, 64.0])
# RMS of each unit's weights
W_RMS = torch.tensor([math.sqrt((0.25 + 4.0) / 2), math.sqrt((9.0 + 1.0) / 2)])


def _stats(per_weight: bool, per_unit: bool = True) -> GradientStatistics:
    stats = GradientStatistics(["fc.weight"], [W.shape], per_weight=per_weight, per_unit=per_unit)
    stats.update([G1], [W])
    stats.update([G2], [W])
    return stats


def test_hand_made_statistics_are_what_the_tests_assume() -> None:
    stats = _stats(per_weight=True)
    torch.testing.assert_close(stats.weight_mean()[0], MEAN)
    torch.testing.assert_close(stats.weight_std()[0], STD)
    torch.testing.assert_close(stats.unit_rms_mean()[0].float(), RMS_MEAN)
    torch.testing.assert_close(stats.unit_rms_std()[0].float(), RMS_STD)
    torch.testing.assert_close(stats.unit_taylor_second_moment()[0].float(), TAYLOR_SECOND_MOMENT)


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [
        ("stability", MEAN.abs() + STD),
        ("weighted_stability", W.abs() * (MEAN.abs() + STD)),
        ("taylor", W.abs() * (MEAN.square() + STD.square()).sqrt()),
        ("magnitude", W.abs()),
    ],
)
def test_weight_scores_with_per_weight_statistics(criterion: str, expected: torch.Tensor) -> None:
    (score,) = scoring.weight_scores(criterion, [W], _stats(per_weight=True))
    assert score.shape == W.shape and score.dtype == torch.float32
    torch.testing.assert_close(score, expected)


FACTOR_STABILITY = (RMS_MEAN + RMS_STD).view(-1, 1)  # (3, 4)
FACTOR_TAYLOR = (RMS_MEAN.square() + RMS_STD.square()).sqrt().view(-1, 1)  # (sqrt 5, sqrt 10)


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [
        ("stability", FACTOR_STABILITY.expand(2, 2)),
        ("weighted_stability", W.abs() * FACTOR_STABILITY),
        ("taylor", W.abs() * FACTOR_TAYLOR),
        ("magnitude", W.abs()),
    ],
)
def test_weight_scores_cheap_per_unit_mode(criterion: str, expected: torch.Tensor) -> None:
    """Without per-weight statistics every weight of a unit shares the unit's gradient factor."""
    (score,) = scoring.weight_scores(criterion, [W], _stats(per_weight=False))
    assert score.shape == W.shape and score.dtype == torch.float32
    torch.testing.assert_close(score, expected)


def test_unit_gradient_factor() -> None:
    stats = _stats(per_weight=False)
    torch.testing.assert_close(scoring.unit_gradient_factor("stability", stats)[0].float(), RMS_MEAN + RMS_STD)
    torch.testing.assert_close(scoring.unit_gradient_factor("taylor", stats)[0].float(), FACTOR_TAYLOR.flatten())


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [
        ("magnitude", W_RMS),
        ("stability", RMS_MEAN + RMS_STD),
        ("weighted_stability", W_RMS * (RMS_MEAN + RMS_STD)),
        ("taylor", TAYLOR_SECOND_MOMENT.sqrt()),
    ],
)
@pytest.mark.parametrize("per_weight", [False, True])
def test_unit_scores(criterion: str, expected: torch.Tensor, per_weight: bool) -> None:
    (score,) = scoring.unit_scores(criterion, [W], _stats(per_weight=per_weight))
    assert score.shape == (2,) and score.dtype == torch.float32
    torch.testing.assert_close(score, expected)


def test_unit_scores_conv_weight() -> None:
    w = torch.randn(4, 3, 2, 2)
    (score,) = scoring.unit_scores("magnitude", [w], None)
    torch.testing.assert_close(score, w.reshape(4, -1).square().mean(1).sqrt())


def test_magnitude_needs_no_statistics() -> None:
    (per_weight,) = scoring.weight_scores("magnitude", [W], None)
    torch.testing.assert_close(per_weight, W.abs())
    (per_unit,) = scoring.unit_scores("magnitude", [W], None)
    torch.testing.assert_close(per_unit, W_RMS)


@pytest.mark.parametrize("criterion", sorted(scoring.GRADIENT_CRITERIA))
def test_gradient_criteria_without_statistics_raise(criterion: str) -> None:
    with pytest.raises(ValueError, match=f"criterion '{criterion}' needs gradient statistics"):
        scoring.weight_scores(criterion, [W], None)
    with pytest.raises(ValueError, match=f"criterion '{criterion}' needs gradient statistics"):
        scoring.unit_scores(criterion, [W], None)


@pytest.mark.parametrize("per_weight", [True, False], ids=["per_weight_stats", "per_unit_stats"])
def test_weight_scores_unknown_criterion_raises(per_weight: bool) -> None:
    with pytest.raises(ValueError, match=r"`criterion` must be one of .*, got 'bogus'"):
        scoring.weight_scores("bogus", [W], _stats(per_weight=per_weight))


def test_unit_scores_unknown_criterion_raises() -> None:
    with pytest.raises(ValueError, match=r"`criterion` must be one of .*, got 'bogus'"):
        scoring.unit_scores("bogus", [W], _stats(per_weight=False))


def test_unit_scores_need_per_unit_statistics() -> None:
    with pytest.raises(RuntimeError, match="per-unit statistics were not tracked"):
        scoring.unit_scores("stability", [W], _stats(per_weight=True, per_unit=False))


def test_below_thresholds_per_weight() -> None:
    # |mean| = [[2, 1], [3, 1]], std = [[1, 2], [1, 3]]
    (flags,) = scoring.below_thresholds(_stats(per_weight=True), False, mean_threshold=1.5, std_threshold=2.5)
    assert torch.equal(flags, torch.tensor([[False, True], [False, False]]))
    (flags,) = scoring.below_thresholds(_stats(per_weight=True), False, mean_threshold=2.5, std_threshold=1.5)
    assert torch.equal(flags, torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize(
    ("per_weight", "structured"), [(True, True), (False, False), (False, True)], ids=["structured", "cheap", "both"]
)
def test_below_thresholds_on_unit_rms(per_weight: bool, structured: bool) -> None:
    # RMS mean (2, 3), std (1, 1): strict comparisons
    stats = _stats(per_weight=per_weight)
    (flags,) = scoring.below_thresholds(stats, structured, mean_threshold=2.5, std_threshold=1.5)
    assert torch.equal(flags, torch.tensor([True, False]))
    (flags,) = scoring.below_thresholds(stats, structured, mean_threshold=2.0, std_threshold=1.5)
    assert torch.equal(flags, torch.tensor([False, False]))
