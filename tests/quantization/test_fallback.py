"""Quantization's per-layer fallback, driven by a fake model state and metric (no Trainer)."""

from __future__ import annotations

import pytest

from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.core.gate import MetricGate
from lightning_compress.quantization.fallback import fall_back, rungs

COST = {"a": {2: 0.05, 4: 0.02, 6: 0.004, 8: 0.001}, "b": {2: 0.001, 4: 0.0005, 6: 0.0, 8: 0.0}}


def _run(bits: int, fallback: str, bound: float):
    state: dict[str, int] = {}

    def apply(plan: dict[str, int]) -> None:
        state.clear()
        state.update(plan)

    def evaluate() -> float:
        return 0.9 - sum(COST[n].get(b, 0.0) for n, b in state.items() if b < FLOAT_BITS)

    plan = {"a": bits, "b": bits}
    after, taken, sensitivity = fall_back(list(plan), plan, apply, evaluate, lambda n, b: 10.0, MetricGate(bound),
                                          0.9, rungs(bits, fallback))
    return plan, after, taken, sensitivity


def test_rungs() -> None:
    assert rungs(4, "float") == [FLOAT_BITS]
    assert rungs(2, "more_bits") == [4, 6, 8, FLOAT_BITS]
    assert rungs(6, "more_bits") == [8, FLOAT_BITS]


def test_the_most_sensitive_layer_climbs_until_the_bound_holds() -> None:
    plan, after, taken, sensitivity = _run(2, "more_bits", bound=0.01)
    assert sensitivity == pytest.approx({"a": 0.05, "b": 0.001})
    assert [(t["layer"], t["to_bits"]) for t in taken] == [("a", 4), ("b", 4), ("a", 6)]
    assert plan == {"a": 6, "b": 4} and 0.9 - after <= 0.01


def test_float_fallback_and_an_unreachable_bound() -> None:
    plan, after, taken, _ = _run(2, "float", bound=0.0)
    assert plan == {"a": FLOAT_BITS, "b": FLOAT_BITS} and after == pytest.approx(0.9)
    assert len(taken) == 2
