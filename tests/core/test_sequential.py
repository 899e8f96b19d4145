"""The gate's early-stop rule on paired per-sample differences: clearly inside, clearly outside, close -> full."""

from __future__ import annotations

import pytest

from lightning_compress.core.sequential import MIN_SAMPLES, PairedDifference, z_value


def _seen(population: int, n: int, drops: int, gains: int = 0) -> PairedDifference:
    """``n`` samples seen: ``drops`` lost by the step (d = 1), ``gains`` won (d = -1), the rest unchanged."""
    paired = PairedDifference(population)
    paired.add(total=drops - gains, squares=drops + gains, count=n)
    return paired


@pytest.mark.parametrize(
    ("population", "n", "drops", "gains", "allowed", "expected"),
    [
        (2000, 200, 0, 0, 0.01, "inside"),  # nothing changed among 200 samples
        (2000, 200, 2, 1, 0.05, "inside"),  # 0.5 % net drop, interval well under 5 points
        (2000, 200, 60, 0, 0.01, "outside"),  # 30 % of the samples lost: far over one point
        (2000, 200, 4, 1, 0.01, "undecided"),  # 1.5 % net drop against a 1-point bound: too close, go on
        (2000, 200, 3, 0, 0.01, "undecided"),  # 1.5 % vs 1 point, a few samples: the interval straddles it
        (2000, MIN_SAMPLES - 1, 60, 0, 0.01, "undecided"),  # too few samples for any early decision
        (200, 200, 3, 0, 0.01, "outside"),  # the whole set seen: the exact value, 1.5 % > 1 point
        (200, 200, 2, 0, 0.01, "inside"),  # exactly at the bound counts as inside (as the gate's rule)
    ],
)
def test_decision(population: int, n: int, drops: int, gains: int, allowed: float, expected: str) -> None:
    assert _seen(population, n, drops, gains).decide(allowed) == expected


def test_interval_matches_the_normal_formula_and_shrinks_with_the_population_seen() -> None:
    paired = _seen(1000, 100, drops=10)
    mean, var = 0.1, (0.1 - 0.01) * 100 / 99
    half = z_value(0.99) * (var / 100 * (900 / 999)) ** 0.5
    assert paired.interval() == pytest.approx((mean - half, mean + half))
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-5)
    low, high = _seen(100, 100, drops=10).interval()
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)


@pytest.mark.parametrize("confidence", [0, 1, 1.5, -0.2])
def test_confidence_outside_0_1_is_refused(confidence: float) -> None:
    with pytest.raises(ValueError, match=r"`confidence` must be a number in \(0, 1\)"):
        z_value(confidence)
