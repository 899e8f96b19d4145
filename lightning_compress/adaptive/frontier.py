"""The size / metric frontier of a set of compressed models, and the budgets to try along it. No Lightning import.

A point is a mapping with ``"bytes"`` (the file as written) and ``"metric"`` (higher is better). Used by
``benchmarks/bench_adaptive.py`` to compare :func:`~lightning_compress.adaptive.compress.compress` with uniform
configurations: the budgets are the sizes where the uniform configurations are at their best (the frontier), so
that at each budget the best uniform configuration that fits is also the one of equal or larger size than the
adaptive file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

Point = TypeVar("Point", bound=Mapping[str, Any])


def frontier(points: Sequence[Point]) -> list[Point]:
    """The points no smaller (or equally small) point matches, smallest first: each is better than all before."""
    out: list[Point] = []
    for point in sorted(points, key=lambda p: (p["bytes"], -p["metric"])):
        if not out or point["metric"] > out[-1]["metric"]:
            out.append(point)
    return out


def best_within(points: Sequence[Point], cap: int) -> Point | None:
    """The best point whose file is at most ``cap`` bytes (the first of equals), None when none fits."""
    fitting = [p for p in points if p["bytes"] <= cap]
    return max(fitting, key=lambda p: p["metric"]) if fitting else None


def budgets_along(points: Sequence[Mapping[str, Any]], count: int, most: int) -> list[int]:
    """Sizes to try: the frontier's (at most ``most``, evenly by rank), with midpoints inserted into the widest gap
    until there are ``count`` (when the frontier has at least two points)."""
    if not 1 <= count <= most:
        raise ValueError(f"`count` must be in [1, `most`={most}], got {count}")
    sizes = [int(p["bytes"]) for p in frontier(points)]
    if len(sizes) > most:
        sizes = [sizes[round(i * (len(sizes) - 1) / (most - 1))] for i in range(most)] if most > 1 else sizes[:1]
    while 1 < len(sizes) < count:
        gap = max(range(len(sizes) - 1), key=lambda i: sizes[i + 1] - sizes[i])
        if sizes[gap + 1] - sizes[gap] < 2:
            break  # no whole byte left between any two sizes
        sizes.insert(gap + 1, (sizes[gap] + sizes[gap + 1]) // 2)
    return sizes
