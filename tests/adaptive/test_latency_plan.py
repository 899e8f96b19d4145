"""The latency plan (adaptive/latency_plan.py) on hand-made latency tables: int8 is chosen only where the measured
rows make progress, a size cap can choose it where latency would not, units and int8 combine, and the predicted bytes
and MACs are the exact arithmetic of the layers."""

from __future__ import annotations

import pytest

from lightning_compress.adaptive.latency import LatencyTable
from lightning_compress.adaptive.latency_plan import CapCosts, LatencyProblem, LayerCost
from lightning_compress.adaptive.units import UnitCandidate
from lightning_compress.structure.dependency import UnitGroup


def problem(int8_seconds: float, int8_loss: float = 0.01) -> LatencyProblem:
    """One Linear family "a" (8 units) feeding a Linear "b": removing 4 units halves "a" and "b"'s columns. Every
    row of "a" and "b" at int8 takes ``int8_seconds`` of its float time; the whole model too."""
    table = LatencyTable(full={"a": (8, 4), "b": (2, 8)}, dense=10.0)
    table.times = {"a": {(8, 4): 4.0, (4, 4): 2.0}, "b": {(2, 8): 4.0, (2, 4): 2.0}}
    table.int8 = {name: {pair: seconds * int8_seconds for pair, seconds in rows.items()}
                  for name, rows in table.times.items()}
    table.int8_models = {frozenset({"a", "b"}): 10.0 * int8_seconds}
    group = UnitGroup("a", 8, consumers=[("b", 1, 0)])
    candidates = {"a": [UnitCandidate("a", 8, 8, 0.0), UnitCandidate("a", 4, 8, 1.0)]}
    return LatencyProblem(candidates, {"a": ["a"]}, {"a": group}, {}, table,
                          int8_scores={"a": int8_loss, "b": int8_loss})


def test_int8_faster_and_cheap_is_chosen_before_units() -> None:
    plan, int8 = problem(0.5).solve_joint((7.0, None, None))
    assert int8 == {"a", "b"} and plan["a"].kept == 8  # int8 alone: 5.0 <= 7.0, no unit lost


def test_int8_slower_is_never_chosen_for_latency() -> None:
    plan, int8 = problem(1.3).solve_joint((7.0, None, None))
    assert int8 == frozenset() and plan["a"].kept == 4
    plan, int8 = problem(1.3).solve_joint((1.0, None, None))  # out of unit moves: still no int8
    assert int8 == frozenset()


def test_int8_is_not_offered_when_not_allowed_and_solve_stays_float() -> None:
    assert problem(0.5).solve_joint((7.0, None, None), int8_allowed=False)[1] == frozenset()
    assert problem(0.5).solve(7.0)["a"].kept == 4


def test_units_and_int8_combine_for_a_tight_target() -> None:
    plan, int8 = problem(0.5).solve_joint((3.0, None, None))
    assert int8 == {"a", "b"} and plan["a"].kept == 4
    assert problem(0.5).predict(plan, int8) == pytest.approx(5.0 * 4.0 / 8.0)  # the int8 model, scaled


def costs() -> CapCosts:
    return CapCosts({"a": LayerCost(1, 1.0, True), "b": LayerCost(1, 1.0, False)}, dense_bytes=500, dense_macs=100)


def test_predicted_bytes_and_macs_are_the_layers_arithmetic() -> None:
    p = problem(1.0)
    p.costs = costs()
    dense_layers = (32 * 4 + 8 * 4) + 16 * 4  # a: weights + bias, b: weights
    seconds, nbytes, macs = p.resources({"a": UnitCandidate("a", 4, 8, 1.0)}, frozenset({"a", "b"}))
    assert nbytes == 500 - dense_layers + (16 + 4 * 4 + 4 * 4) + (8 + 2 * 4)  # int8: codes + a scale per row
    assert macs == 100 - (32 + 16) + (16 + 8)
    assert seconds == pytest.approx(10.0 * 4.0 / 8.0)


def test_a_size_cap_chooses_int8_even_when_it_is_not_faster() -> None:
    p = problem(1.1, int8_loss=0.3)
    p.costs = costs()
    plan, int8 = p.solve_joint((20.0, 400.0, None))  # latency already met; only int8 reaches 400 bytes
    assert int8 == {"a", "b"} and plan["a"].kept == 8  # 0.6 predicted loss for 104 bytes, units: 1.0 for 112
    assert p.resources(plan, int8)[1] <= 400


def test_int8_taken_early_is_dropped_when_float_is_faster_at_the_units_reached() -> None:
    p = problem(0.5)
    p.table.int8 = {"a": {(8, 4): 2.0, (4, 4): 1.9}, "b": {(2, 8): 2.0, (2, 4): 1.9}}  # int8 barely shrinks
    p.table.int8_models = {frozenset({"a", "b"}): 6.0}
    # the greedy takes int8 first (dense 10 -> 6 for 0.02), then units: 6 * 3.8 / 4 = 5.7; float at 4 units: 5.0
    plan, int8 = p.solve_joint((3.0, None, None))
    assert int8 == frozenset() and plan["a"].kept == 4
