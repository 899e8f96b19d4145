"""The pruning run's decisions, without a Trainer: when an event is due, what it aims at, whether its result is
kept (the metric gate), and how the run backs off after a refused step. No Lightning import.

The callback gathers the facts (the metric before and after the event, whether the weights are finite, the
sparsity reached) and asks :meth:`PruningController.conclude`; every rank asks with the same facts and gets the same
answer. The controller's state is plain values: :meth:`state_dict` / :meth:`load_state_dict` resume it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from lightning_compress.core.gate import MetricGate, Verdict
from lightning_compress.pruning.schedule import PruningSchedule

MAX_BACKOFFS = 3  # refused steps in a row before pruning stops
_MIN_CAP_GAP = 1e-3  # a back-off that would aim less than this above the current sparsity stops instead


@dataclass(frozen=True)
class Decision:
    accepted: bool
    drop: float | None  # metric_after vs the reference (what the gate judged)
    reference: float | None
    note: str  # what happens next after a refusal ("backing off ...", "pruning stopped")
    reason: str  # why it was refused


class PruningController:
    """Accept / roll back / back off. ``reference``: ``"previous"`` judges each event against the metric measured
    immediately before it, ``"initial"`` against the metric before the first event."""

    def __init__(self, gate: MetricGate, reference: str = "previous", on_violation: str = "backoff") -> None:
        self.gate = gate
        self.reference = reference
        self.on_violation = on_violation
        self.last_tick: int | None = None
        self.sparsity_cap: float | None = None  # lowered by back-offs
        self.backoffs = 0
        self.stopped = False
        self.initial_metric: float | None = None  # the metric before the first event
        self.history: list[dict[str, Any]] = []  # one entry per event

    # ------------------------------------------------------------------ when and how much
    def due(self, tick: int, schedule: PruningSchedule | None) -> bool:
        """Whether ``tick`` holds an event not yet handled (call once per tick; marks it handled)."""
        if schedule is None or self.stopped or tick == self.last_tick or not schedule.is_event(tick):
            return False
        self.last_tick = tick
        return True

    def finished(self, schedule: PruningSchedule | None) -> bool:
        """No event can follow any more (statistics need not be collected)."""
        last = schedule.last_tick() if schedule is not None else None
        return self.stopped or (last is not None and self.last_tick is not None and self.last_tick >= last)

    def target(self, tick: int, schedule: PruningSchedule) -> float | None:
        """The schedule's target at ``tick``, capped by earlier back-offs."""
        target = schedule.target(tick)
        if target is not None and self.sparsity_cap is not None:
            target = min(target, self.sparsity_cap)
        return target

    # ------------------------------------------------------------------ the verdict
    def reference_for(self, metric_before: float | None) -> float | None:
        if self.initial_metric is None:
            self.initial_metric = metric_before
        return self.initial_metric if self.reference == "initial" else metric_before

    def conclude(
        self,
        *,
        tick: int,
        step: int,
        metric_before: float | None,
        metric_after: float | None,
        weights_finite: bool,
        sparsity_before: float,
        sparsity_tried: float,
        extra: dict[str, Any] | None = None,
    ) -> Decision:
        """Judge the event that took the sparsity from ``sparsity_before`` to ``sparsity_tried`` and the metric from
        ``metric_before`` to ``metric_after``; record it; on a refusal, back off (or stop)."""
        reference = self.reference_for(metric_before)
        verdict: Verdict = self.gate.judge(reference, metric_after, weights_finite=weights_finite)
        note = ""
        if verdict.accepted:
            self.backoffs = 0
        else:
            note = self._back_off(sparsity_before, sparsity_tried)
        self.history.append({
            "tick": tick, "step": step, "metric_before": metric_before, "metric_after": metric_after,
            "reference": reference, "drop": verdict.drop, "sparsity_tried": sparsity_tried,
            "sparsity": sparsity_tried if verdict.accepted else sparsity_before, "accepted": verdict.accepted,
            "reason": verdict.reason, "note": note, **(extra or {}),
        })
        return Decision(verdict.accepted, verdict.drop, reference, note, verdict.reason)

    def _back_off(self, current: float, rejected: float) -> str:
        self.backoffs += 1
        if self.on_violation == "stop" or self.backoffs >= MAX_BACKOFFS:
            self.stopped = True
            return "pruning stopped"
        self.sparsity_cap = current + (rejected - current) / 2
        if self.sparsity_cap - current < _MIN_CAP_GAP:
            self.stopped = True
            return "pruning stopped"
        return f"backing off: sparsity capped at {self.sparsity_cap:.3f}"

    # ------------------------------------------------------------------ summary
    def largest_accepted_drop(self) -> float | None:
        drops = [h["drop"] for h in self.history if h["accepted"] and h["drop"] is not None]
        return max(drops) if drops else None

    def rollbacks(self) -> int:
        return sum(not h["accepted"] for h in self.history)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_tick": self.last_tick, "sparsity_cap": self.sparsity_cap, "backoffs": self.backoffs,
            "stopped": self.stopped, "initial_metric": self.initial_metric, "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_tick = state.get("last_tick")
        self.sparsity_cap = state.get("sparsity_cap")
        self.backoffs = int(state.get("backoffs", 0))
        self.stopped = bool(state.get("stopped", False))
        self.initial_metric = state.get("initial_metric", state.get("baseline_metric"))
        self.history = list(state.get("history", []))
