"""The metric gate: one rule for pruning's rollback and quantization's fallback."""

from __future__ import annotations

import math

import pytest

from lightning_compress.core.gate import MetricGate, metric_drop


def test_metric_drop_is_signed_by_direction() -> None:
    assert metric_drop(0.9, 0.85, higher_is_better=True) == pytest.approx(0.05)
    assert metric_drop(0.9, 0.95, higher_is_better=True) == pytest.approx(-0.05)
    assert metric_drop(1.0, 1.2, higher_is_better=False) == pytest.approx(0.2)  # a loss that grew


@pytest.mark.parametrize(
    ("reference", "after", "accepted"),
    [(0.90, 0.89, True), (0.90, 0.88, True), (0.90, 0.8799, False), (0.90, 0.95, True)],
)
def test_a_step_is_kept_within_the_bound(reference: float, after: float, accepted: bool) -> None:
    verdict = MetricGate(max_drop=0.02).judge(reference, after)
    assert verdict.accepted is accepted
    assert verdict.drop == pytest.approx(reference - after)
    assert (verdict.reason == "") is accepted


def test_lower_is_better_metrics_are_judged_the_other_way() -> None:
    gate = MetricGate(max_drop=0.1, higher_is_better=False)
    assert gate.judge(1.0, 1.05).accepted and not gate.judge(1.0, 1.2).accepted


@pytest.mark.parametrize("bound", [None, 0.5])
def test_nothing_broken_is_ever_accepted(bound: float | None) -> None:
    gate = MetricGate(max_drop=bound)
    assert not gate.judge(0.9, math.nan).accepted
    assert not gate.judge(0.9, math.inf).accepted
    verdict = gate.judge(0.9, 0.9, weights_finite=False)
    assert not verdict.accepted and "not finite" in verdict.reason


def test_without_a_bound_or_a_measurement_the_metric_is_not_judged() -> None:
    assert MetricGate(max_drop=None).judge(0.9, 0.1).accepted
    assert MetricGate(max_drop=0.01).judge(None, None).accepted
    assert MetricGate(max_drop=0.01).judge(math.nan, 0.5).accepted  # a broken reference cannot be worsened
