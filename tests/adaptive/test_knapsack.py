"""The multiple-choice knapsack against brute force on small random instances."""

from __future__ import annotations

import itertools
import random

import pytest

from lightning_compress.adaptive.knapsack import solve, solve_two


def _instance(rng: random.Random, groups: int, options: int) -> tuple[list[list[float]], list[list[float]],
                                                                          list[list[float]]]:
    scores = [[rng.uniform(0, 10) for _ in range(options)] for _ in range(groups)]
    costs = [[float(rng.randint(1, 20)) for _ in range(options)] for _ in range(groups)]
    second = [[float(rng.randint(1, 20)) for _ in range(options)] for _ in range(groups)]
    return scores, costs, second


def _brute(scores: list[list[float]], costs: list[list[float]], cap: float,
           second: list[list[float]] | None = None, second_cap: float = 0.0) -> float | None:
    best = None
    for picks in itertools.product(*(range(len(s)) for s in scores)):
        if sum(c[i] for c, i in zip(costs, picks)) > cap:
            continue
        if second is not None and sum(m[i] for m, i in zip(second, picks)) > second_cap:
            continue
        total = sum(s[i] for s, i in zip(scores, picks))
        best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    scores, costs, _ = _instance(rng, rng.randint(1, 5), rng.randint(1, 4))
    cap = float(rng.randint(0, 60))
    plan = solve(scores, costs, cap)  # integer costs, room below the default buckets: one unit per byte, exact
    best = _brute(scores, costs, cap)
    if best is None:
        assert plan is None
        return
    assert plan is not None
    assert sum(c[i] for c, i in zip(costs, plan)) <= cap
    assert sum(s[i] for s, i in zip(scores, plan)) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(20))
def test_coarse_buckets_never_exceed_the_cap(seed: int) -> None:
    rng = random.Random(100 + seed)
    scores, costs, _ = _instance(rng, 5, 4)
    cap = float(rng.randint(20, 80))
    plan = solve(scores, costs, cap, buckets=7)  # costs rounded up to units of the room / 7
    if plan is not None:
        assert sum(c[i] for c, i in zip(costs, plan)) <= cap


@pytest.mark.parametrize("seed", range(30))
def test_two_caps_are_both_met(seed: int) -> None:
    rng = random.Random(200 + seed)
    scores, costs, second = _instance(rng, 4, 3)
    cap, second_cap = float(rng.randint(15, 60)), float(rng.randint(15, 60))
    plan = solve_two(scores, costs, cap, second, second_cap)
    best = _brute(scores, costs, cap, second, second_cap)
    if plan is None:
        return  # the Lagrangian may miss a feasible plan; it never returns an infeasible one
    assert best is not None
    assert sum(c[i] for c, i in zip(costs, plan)) <= cap
    assert sum(m[i] for m, i in zip(second, plan)) <= second_cap
    assert sum(s[i] for s, i in zip(scores, plan)) >= best - 1e-9


def test_lagrangian_finds_most_feasible_instances() -> None:
    found = feasible = 0
    for seed in range(60):
        rng = random.Random(300 + seed)
        scores, costs, second = _instance(rng, 4, 3)
        cap, second_cap = float(rng.randint(15, 60)), float(rng.randint(15, 60))
        if _brute(scores, costs, cap, second, second_cap) is not None:
            feasible += 1
            found += solve_two(scores, costs, cap, second, second_cap) is not None
    assert feasible > 20 and found == feasible


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="same number of options"):
        solve([[1.0, 2.0]], [[1.0]], 5.0)
