"""The multiple-choice knapsack against brute force on small random instances."""

from __future__ import annotations

import itertools
import random

import pytest

from lightning_compress.adaptive.knapsack import _undominated, solve, solve_two


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


def test_ties_go_to_the_first_option_and_matched_options_change_no_plan() -> None:
    # group 0: options 1 and 2 equal option 0 (same score and cost) or are worse in both; option 3 is cheaper
    scores = [[1.0, 1.0, 2.0, 5.0], [0.0, 3.0]]
    costs = [[10.0, 10.0, 12.0, 2.0], [8.0, 1.0]]
    assert solve(scores, costs, cap=18.0) == [0, 0]
    assert solve(scores, costs, cap=12.0) == [0, 1]
    assert solve(scores, costs, cap=10.0) == [3, 0]
    assert _undominated(scores[0], [10, 10, 12, 2]) == [0, 3]
    # an option only matched by a later one stays: it wins the tie
    assert _undominated([1.0, 1.0], [5, 5]) == [0]
    assert _undominated([2.0, 1.0], [5, 5]) == [0, 1]


@pytest.mark.parametrize("seed", range(20))
def test_skipping_matched_options_chooses_as_the_plain_loop(seed: int) -> None:
    rng = random.Random(seed)
    scores = [[float(rng.randint(0, 5)) for _ in range(8)] for _ in range(5)]  # many ties
    costs = [[float(rng.randint(1, 6)) for _ in range(8)] for _ in range(5)]
    cap = float(rng.randint(5, 30))
    assert solve(scores, costs, cap) == _plain_loop(scores, costs, cap)


def _plain_loop(scores: list[list[float]], costs: list[list[float]], cap: float) -> list[int] | None:
    """The DP over every option with integer costs (unit 1), first of equal minima kept: the reference."""
    base = sum(min(c) for c in costs)
    if base > cap:
        return None
    n = int(cap - base) + 1
    best, choices = [0.0] * n, []
    for group_scores, group_costs in zip(scores, costs):
        used = [int(c - min(group_costs)) for c in group_costs]
        new, pick = [float("inf")] * n, [-1] * n
        for index, (score, units) in enumerate(zip(group_scores, used)):
            for b in range(units, n):
                if best[b - units] + score < new[b]:
                    new[b], pick[b] = best[b - units] + score, index
        best = new
        choices.append(pick)
    plan, left = [], n - 1
    for group_costs, pick in zip(reversed(costs), reversed(choices)):
        plan.append(pick[left])
        left -= int(group_costs[pick[left]] - min(group_costs))
    return plan[::-1]
