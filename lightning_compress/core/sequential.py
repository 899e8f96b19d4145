"""The gate's early stop: judge a compression step on part of the validation data when the answer is already clear.
No Lightning import.

Before and after a step the model is run on the *same* samples, so each sample gives one paired difference
``d = correct_before - correct_after`` (in {-1, 0, 1}; the drop of an accuracy-type metric is their mean). The
running mean of ``d`` and its standard error give a two-sided normal confidence interval, shrunk by the
finite-population correction (the samples are drawn without replacement from the validation set). The step is:

- clearly **inside** the bound when the whole interval is at or below the allowed drop (accept),
- clearly **outside** when the whole interval is above it (refuse),
- otherwise undecided: evaluate more; once the subset is exhausted, the caller falls back to the full set.

Two things keep the error at most ``1 - confidence`` although the rule looks at the data more than once:

- **Looks at doubling sizes only.** The interval is judged the first time the samples seen reach ``MIN_SAMPLES``,
  ``2 MIN_SAMPLES``, ``4 MIN_SAMPLES``, ... (below the population), and the error budget is split evenly between
  those looks (Bonferroni): each look uses the quantile of ``1 - (1 - confidence) / looks``. Checking after every
  batch at a fixed quantile would spend the budget once per batch.
- **A variance floor.** A step that costs a few samples in a hundred can show no changed prediction in the first
  hundred samples; their variance is 0 and a plain interval would be the single point 0. The variance is computed
  as if one sample more had gained and one had lost ``scale`` (the largest ``|d|`` a sample can give; Agresti-style
  pseudo-counts), so an interval never gets narrower than what two changed samples in ``n`` would give.

Once every sample is seen the value is exact (the interval is the point). The rule only applies to metrics that
are the mean of a per-sample value: micro accuracy, or macro accuracy with each difference weighted by
``N / (K n_k)`` for its sample's class k (see :mod:`lightning_compress.integration.gate_record`; the values are then
in {-w, 0, w} and ``scale`` is the largest w); the caller uses the full set for every other metric. Every rank
feeds the rule the same all-reduced sums, so every rank decides alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal

from lightning_compress.core.validation import check_number

Decision = Literal["inside", "outside", "undecided"]
MIN_SAMPLES = 64
DEFAULT_CONFIDENCE = 0.99
PSEUDO_COUNT = 1.0  # pseudo-samples added on each side (+scale and -scale) to the variance only


def z_value(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (2.576 at 0.99)."""
    check_number("confidence", confidence, low=0, high=1, low_inclusive=False, high_inclusive=False)
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def looks(population: int) -> int:
    """How many early looks a set of ``population`` samples allows: one at each of ``MIN_SAMPLES * 2**k`` below
    the population (at least one)."""
    count, size = 0, MIN_SAMPLES
    while size < population:
        count, size = count + 1, size * 2
    return max(count, 1)


def look_confidence(confidence: float, population: int) -> float:
    """The confidence of one early look: the budget ``1 - confidence`` split evenly between :func:`looks`."""
    return 1 - (1 - confidence) / looks(population)


@dataclass
class PairedDifference:
    """Running sums of the paired per-sample differences ``before - after`` (already reduced over all ranks).
    ``scale``: the largest ``|d|`` one sample can give (1 for micro accuracy), the size of the variance floor."""

    population: int  # samples in the whole validation set (all ranks), for the finite-population correction
    scale: float = 1.0
    total: float = 0.0
    squares: float = 0.0
    count: int = 0
    next_look: int = field(default=MIN_SAMPLES)  # the samples seen at which the next look is due

    def add(self, total: float, squares: float, count: int) -> None:
        self.total += total
        self.squares += squares
        self.count += count

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def exact(self) -> bool:
        """Whether every sample of the population has been seen (the mean is then the whole set's)."""
        return self.count >= self.population

    def interval(self, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
        """The confidence interval of the whole set's mean difference, from the samples seen, at ``confidence``
        for one look (:meth:`decide` passes the per-look level), with the variance floor of the module."""
        if self.count == 0:
            return -math.inf, math.inf
        pseudo = 2 * PSEUDO_COUNT
        n = self.count + pseudo
        variance = max((self.squares + pseudo * self.scale**2) / n - (self.total / n) ** 2, 0.0) * n / (n - 1)
        correction = max(self.population - self.count, 0) / max(self.population - 1, 1)
        half = z_value(confidence) * math.sqrt(variance / self.count * correction)
        return self.mean - half, self.mean + half

    def decide(self, allowed_drop: float, confidence: float = DEFAULT_CONFIDENCE) -> Decision:
        """``inside`` / ``outside`` the bound (a mean difference at most ``allowed_drop``), or ``undecided``.
        Between looks (see the module) it answers ``undecided`` without judging; a call at or past a look spends
        that look. Once every sample is seen the answer is exact."""
        if not self.exact:
            if self.count < self.next_look:
                return "undecided"
            while self.next_look <= self.count:
                self.next_look *= 2
            confidence = look_confidence(confidence, self.population)
        low, high = self.interval(confidence)
        if high <= allowed_drop + 1e-12:
            return "inside"
        if low > allowed_drop + 1e-12:
            return "outside"
        return "undecided"
