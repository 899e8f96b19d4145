"""Multiple-choice knapsack: one option per group, the smallest summed score with the summed cost under a cap.

:func:`solve` is a dynamic program over the room the cheapest plan leaves under the cap (each option's cost above
its group's cheapest), cut into at most ``buckets`` units and never into units below one (costs are bytes or MACs).
Each cost is rounded *up* to whole units, so every plan it returns truly fits the cap; it is exact when the costs
are integers and the room is at most ``buckets``, and the cheapest plan is always found when it fits. Options that
an earlier option of their group matches in both score and units are skipped (they could never be chosen). A second
resource is bound by :func:`solve_two`: a Lagrange multiplier on it, found by bisection, added to the scores of a
:func:`solve` on the first. No Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BUCKETS = 4096  # units the cap is cut into: enough for per-layer costs a fraction of a percent of the cap apart


def solve(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], cap: float,
          buckets: int = BUCKETS) -> list[int] | None:
    """Index of the chosen option per group, or None when even the cheapest options exceed ``cap``."""
    if len(scores) != len(costs) or any(len(s) != len(c) or not s for s, c in zip(scores, costs)):
        raise ValueError("`scores` and `costs` must hold the same number of options per group, at least one each")
    base = sum(min(c) for c in costs)
    if base > cap:
        return None
    costs = [[c - min(group) for c in group] for group in costs]
    unit = max((cap - base) / buckets, 1.0)
    buckets = math.floor((cap - base) / unit + 1e-9)
    n = buckets + 1
    best = np.zeros(n)  # best[b]: smallest score of the groups so far using at most b units
    choices = []
    for group_scores, group_costs in zip(scores, costs):
        units = [math.ceil(c / unit - 1e-9) for c in group_costs]
        new = np.full(n, np.inf)
        pick = np.full(n, -1, dtype=np.int64)
        for index in _undominated(group_scores, units):
            score, used = group_scores[index], units[index]
            if used > buckets:
                continue
            candidate = best[: n - used] + score  # b units in all: this option's `used` plus b - used before it
            better = candidate < new[used:]  # strictly: the first of equal options stays
            new[used:][better], pick[used:][better] = candidate[better], index
        best = new
        choices.append(pick)
    if not np.isfinite(best[-1]):
        return None
    plan, left = [], buckets
    for group_costs, pick in zip(reversed(costs), reversed(choices)):
        index = int(pick[left])
        plan.append(index)
        left -= math.ceil(group_costs[index] / unit - 1e-9)
    return plan[::-1]


def _undominated(scores: Sequence[float], units: Sequence[int]) -> list[int]:
    """Indices of the options no earlier option matches in both score and units. ``best`` never rises with more
    units, so such an option is never strictly better anywhere and the loop would not choose it: skipping it
    changes no plan (an option only matched by a *later* one is kept, since it wins their ties)."""
    s, u = np.asarray(scores, dtype=float), np.asarray(units)
    earlier = np.tri(len(s), k=-1, dtype=bool).T  # earlier[i, j]: i < j
    matched = (s[:, None] <= s[None, :]) & (u[:, None] <= u[None, :]) & earlier
    return [int(i) for i in np.flatnonzero(~matched.any(axis=0))]


def solve_two(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], cap: float,
              second: Sequence[Sequence[float]], second_cap: float, buckets: int = BUCKETS,
              steps: int = 40) -> list[int] | None:
    """:func:`solve` under ``cap`` with also the summed ``second`` cost at most ``second_cap``: the smallest
    multiplier found by bisection that brings the second cost under its cap (near-exact, not exact)."""
    def plan_at(multiplier: float) -> list[int] | None:
        return solve([[s + multiplier * m for s, m in zip(ss, ms)] for ss, ms in zip(scores, second)], costs, cap,
                     buckets)

    def second_of(plan: list[int]) -> float:
        return sum(ms[i] for ms, i in zip(second, plan))

    plan = plan_at(0.0)
    if plan is None or second_of(plan) <= second_cap:
        return plan
    spread = sum(max(ss) - min(ss) for ss in scores) + 1e-12
    gaps = [np.diff(np.unique(np.asarray(ms, dtype=float))) for ms in second]  # sorted distinct values' steps
    finest = min((float(g.min()) for g in gaps if g.size), default=1.0)  # the smallest |a - b|, a != b
    high = spread / finest * 4
    top = plan_at(high)
    if top is None or second_of(top) > second_cap:
        return None
    low = 0.0
    for _ in range(steps):
        middle = (low + high) / 2
        trial = plan_at(middle)
        if trial is not None and second_of(trial) <= second_cap:
            high, top = middle, trial
        else:
            low = middle
    return top
