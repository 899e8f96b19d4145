"""The gate's early stop: judge a compression step on part of the validation data when the answer is already clear.
No Lightning import.

Before and after a step the model is run on the *same* samples, so each sample gives one paired difference
``d = correct_before - correct_after`` (in {-1, 0, 1}; the drop of an accuracy-type metric is their mean). After
each batch the running mean of ``d`` and its standard error give a two-sided normal confidence interval at
``confidence``, shrunk by the finite-population correction (the samples are drawn without replacement from the
validation set). The step is:

- clearly **inside** the bound when the whole interval is at or below the allowed drop (accept),
- clearly **outside** when the whole interval is above it (refuse),
- otherwise undecided: evaluate more; once the subset is exhausted, the caller falls back to the full set.

At least ``MIN_SAMPLES`` samples are seen before any early decision (the normal approximation of a mean of
{-1, 0, 1} values needs some). Where every difference seen is 0 the standard error is 0 and the interval is the
point: a step that changed no prediction among many samples is accepted early, which is what "inside" means.
The rule only applies to metrics that are the mean of a per-sample value: micro accuracy, or macro accuracy with
each difference weighted by ``N / (K n_k)`` for its sample's class k (see
:mod:`lightning_compress.integration.gate_record`; the values are then in {-w, 0, w}); the caller uses the full set
for every other metric. Every rank feeds the rule the same all-reduced sums, so every rank decides alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

from lightning_compress.core.validation import check_number

Decision = Literal["inside", "outside", "undecided"]
MIN_SAMPLES = 64
DEFAULT_CONFIDENCE = 0.99


def z_value(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (2.576 at 0.99)."""
    check_number("confidence", confidence, low=0, high=1, low_inclusive=False, high_inclusive=False)
    return NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass
class PairedDifference:
    """Running sums of the paired per-sample differences ``before - after`` (already reduced over all ranks)."""

    population: int  # samples in the whole validation set (all ranks), for the finite-population correction
    total: float = 0.0
    squares: float = 0.0
    count: int = 0

    def add(self, total: float, squares: float, count: int) -> None:
        self.total += total
        self.squares += squares
        self.count += count

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def interval(self, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
        """The confidence interval of the whole set's mean difference, from the samples seen."""
        if self.count == 0:
            return -math.inf, math.inf
        variance = max(self.squares / self.count - self.mean**2, 0.0)
        sample_variance = variance * self.count / max(self.count - 1, 1)
        correction = max(self.population - self.count, 0) / max(self.population - 1, 1)
        half = z_value(confidence) * math.sqrt(sample_variance / self.count * correction)
        return self.mean - half, self.mean + half

    def decide(self, allowed_drop: float, confidence: float = DEFAULT_CONFIDENCE) -> Decision:
        """``inside`` / ``outside`` the bound (a mean difference at most ``allowed_drop``), or ``undecided``."""
        if self.count < min(MIN_SAMPLES, self.population):
            return "undecided"
        low, high = self.interval(confidence)
        if high <= allowed_drop + 1e-12:
            return "inside"
        if low > allowed_drop + 1e-12:
            return "outside"
        return "undecided"
