"""frontier / best_within / budgets_along on hand-made points: what is dominated drops out, the best fitting point
is found, the budgets lie on the frontier (with midpoints only where it is short), and bad counts are refused."""

from __future__ import annotations

import pytest

from lightning_compress.adaptive.frontier import best_within, budgets_along, frontier

POINTS = [
    {"name": "a", "bytes": 100, "metric": 0.50},
    {"name": "b", "bytes": 150, "metric": 0.40},  # larger and worse than a: dominated
    {"name": "c", "bytes": 200, "metric": 0.80},
    {"name": "d", "bytes": 200, "metric": 0.70},  # as small as c and worse
    {"name": "e", "bytes": 400, "metric": 0.80},  # larger, no better than c
    {"name": "f", "bytes": 800, "metric": 0.90},
]


def test_the_frontier_keeps_only_points_better_than_every_smaller_one() -> None:
    assert [p["name"] for p in frontier(POINTS)] == ["a", "c", "f"]
    assert frontier([]) == []


@pytest.mark.parametrize(("cap", "name"), [(99, None), (100, "a"), (199, "a"), (200, "c"), (799, "c"), (800, "f")])
def test_best_within_is_the_best_point_that_fits(cap: int, name: str | None) -> None:
    best = best_within(POINTS, cap)
    assert (best["name"] if best else None) == name


def test_budgets_are_the_frontier_sizes_with_midpoints_in_the_widest_gaps() -> None:
    assert budgets_along(POINTS, count=3, most=6) == [100, 200, 800]
    assert budgets_along(POINTS, count=5, most=6) == [100, 200, 350, 500, 800]  # 500, then 350
    many = [{"bytes": b, "metric": float(b)} for b in range(10, 110, 10)]
    assert budgets_along(many, count=4, most=4) == [10, 40, 70, 100]


def test_budgets_stop_when_no_byte_is_left_between_sizes() -> None:
    assert budgets_along([{"bytes": 5, "metric": 0.0}, {"bytes": 6, "metric": 1.0}], count=4, most=6) == [5, 6]


@pytest.mark.parametrize(("count", "most"), [(0, 6), (7, 6)])
def test_a_count_outside_one_to_most_is_refused(count: int, most: int) -> None:
    with pytest.raises(ValueError, match=rf"`count` must be in \[1, `most`={most}\], got {count}"):
        budgets_along(POINTS, count=count, most=most)
