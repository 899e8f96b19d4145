"""The metric gate: is a compression step within the bound? One rule for both callbacks. No Lightning import.

The rule, as the README states it: **a compression step is kept only if the model's weights are finite, its metric
is finite, and the metric is at most ``max_metric_drop`` worse than the reference**, where the reference is the
metric measured immediately before that step (``"previous"``, the default: the model as it has recovered from
earlier steps) or, for pruning with ``metric_reference="initial"``, the metric measured before the first pruning
event (a fixed budget for the whole run, for pruning an already trained model).

Without ``max_metric_drop`` no step is judged on its metric, but a step that leaves non-finite weights or a
non-finite metric is still refused: nothing broken is ever "accepted".

Pruning rolls a refused step back; quantization falls back layer by layer until the gate passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

MetricReference = Literal["previous", "initial"]
REFERENCES: tuple[str, ...] = ("previous", "initial")
_ROUNDING = 1e-9  # 0.90 - 0.88 is 0.020000000000000018 in floating point: a drop equal to the bound is within it


def metric_drop(before: float, after: float, higher_is_better: bool) -> float:
    """How much worse ``after`` is than ``before``, in the metric's own units (negative when it improved)."""
    return before - after if higher_is_better else after - before


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    drop: float | None  # after vs the reference (None: nothing to compare)
    reason: str  # why it was refused ("" when accepted)


@dataclass(frozen=True)
class MetricGate:
    max_drop: float | None = None  # None: no bound on the metric (finiteness is still required)
    higher_is_better: bool = True

    def drop(self, reference: float | None, after: float | None) -> float | None:
        if reference is None or after is None:
            return None
        return metric_drop(reference, after, self.higher_is_better)

    def judge(self, reference: float | None, after: float | None, *, weights_finite: bool = True) -> Verdict:
        """The verdict on a step that took the metric to ``after``, judged against ``reference``."""
        drop = self.drop(reference, after)
        if not weights_finite:
            return Verdict(False, drop, "the weights are not finite (NaN / inf) after the step")
        if after is not None and not math.isfinite(after):
            return Verdict(False, drop, f"the metric is not finite after the step ({after})")
        if self.max_drop is None or drop is None or not math.isfinite(drop):
            return Verdict(True, drop, "")  # a non-finite reference cannot be worsened
        if drop > self.max_drop + _ROUNDING:
            return Verdict(False, drop, f"the metric dropped by {drop:.4g} > max_metric_drop={self.max_drop}")
        return Verdict(True, drop, "")

    def passes(self, reference: float | None, after: float | None) -> bool:
        return self.judge(reference, after).accepted
