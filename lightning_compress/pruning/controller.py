"""The pruning run's decisions, without a Trainer: when an event is due, what it aims at, whether its result is
kept (the metric gate), and how the run backs off after a refused step and retries it. No Lightning import.

After a refused step (``on_violation="backoff"``) the sparsity is capped halfway between the current sparsity and
the refused one, and the step is retried from the weights reached by then: ``patience`` ticks later or at the next
validation, whichever comes first (``patience=None``: at the next validation only). The retry of a step refused at the
schedule's own target aims at the cap; the retry of a capped step (refused or kept) lifts the cap when the model
has *recovered*: its metric, measured before the retry, is back within the bound of the reference the refused step
was judged against. So the run climbs back to the schedule's target by halves instead of repeating the step that
failed, and a refusal early in a fit (a model still learning) no longer caps the rest of it. A retry refused again
halves the cap again. ``on_violation="stop"`` stops pruning at
the first refusal, as it always did.

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

_MIN_CAP_GAP = 1e-3  # a capped try aiming less than this above the current sparsity is not made (a retry waits)
SHORTFALL = 5e-3  # delivered sparsity this far below the target is "short" (structured rounding stays within it)


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

    def __init__(self, gate: MetricGate, reference: str = "previous", on_violation: str = "backoff",
                 patience: int | None = None) -> None:
        self.gate = gate
        self.reference = reference
        self.on_violation = on_violation
        self.patience = patience
        self.last_tick: int | None = None
        self.sparsity_cap: float | None = None  # lowered by back-offs, lifted when the model has recovered
        self.backoffs = 0  # refusals since the last accepted step
        self.retry_at: int | None = None  # a refused step waits for a retry: at this tick (or the next validation)
        self.refused: dict[str, Any] | None = None  # the last refused step: its reference, whether it was capped
        self.deferred = False  # align_events: an event due during the epoch waits for the validation at its end
        self.stopped = False
        self.initial_metric: float | None = None  # the metric before the first event
        self.history: list[dict[str, Any]] = []  # one entry per event

    # ------------------------------------------------------------------ when and how much
    def due(self, tick: int, schedule: PruningSchedule | None, validated: bool = False) -> bool:
        """Whether ``tick`` holds an event not yet handled: one of the schedule's, or the retry of a refused step
        (``validated``: a validation just ended). Call once per tick; marks it handled."""
        if schedule is None or self.stopped:
            return False
        if validated and self.deferred:
            self.deferred, self.last_tick = False, tick
            return True
        if tick == self.last_tick:
            return False
        if not (schedule.is_event(tick) or self.retry_due(tick, validated)):
            return False
        self.last_tick = tick
        return True

    def retry_due(self, tick: int, validated: bool = False) -> bool:
        """Whether the retry of a refused step is due at ``tick``: ``patience`` ticks after the refusal, or at the
        first validation after it."""
        if self.retry_at is None or tick == self.last_tick:
            return False
        return validated or (self.patience is not None and tick >= self.retry_at)

    def finished(self, schedule: PruningSchedule | None) -> bool:
        """No event can follow any more (statistics need not be collected): stopped, or past the schedule's last
        event with no retry pending."""
        last = schedule.last_tick() if schedule is not None else None
        if self.stopped:
            return True
        past = last is not None and self.last_tick is not None and self.last_tick >= last
        return past and self.retry_at is None and not self.deferred

    def recover(self, metric_before: float | None) -> bool:
        """At a retry, lift the cap when the model has recovered (see the module's docstring); returns whether it
        was lifted. ``metric_before``: the metric measured now, before the retried step."""
        if self.refused is None or self.sparsity_cap is None or not self.refused["capped"]:
            return False  # the step refused at the schedule's target: its retry tries the cap first
        if metric_before is None or not self.gate.judge(self.refused["reference"], metric_before).accepted:
            return False
        self.sparsity_cap = None
        return True

    def target(self, tick: int, schedule: PruningSchedule) -> float | None:
        """The target in force at ``tick`` (the schedule's, also between its events for a retry), capped by
        back-offs not yet lifted."""
        target = schedule.target_by(tick)
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
            if self.sparsity_cap is None:
                self.retry_at, self.refused = None, None
            else:  # kept at the cap: the cap waits for the model to recover, so a retry stays pending
                self.retry_at = tick + (self.patience or 0)
                if self.refused is not None:
                    self.refused["capped"] = True
        else:
            self.refused = {"reference": reference, "capped": self.sparsity_cap is not None}
            note = self._back_off(tick, sparsity_before, sparsity_tried)
        self.history.append({
            "tick": tick, "step": step, "metric_before": metric_before, "metric_after": metric_after,
            "reference": reference, "drop": verdict.drop, "sparsity_tried": sparsity_tried,
            "sparsity": sparsity_tried if verdict.accepted else sparsity_before, "accepted": verdict.accepted,
            "reason": verdict.reason, "note": note, **(extra or {}),
        })
        return Decision(verdict.accepted, verdict.drop, reference, note, verdict.reason)

    def _back_off(self, tick: int, current: float, rejected: float) -> str:
        self.backoffs += 1
        if self.on_violation == "stop":
            self.stopped = True
            return "pruning stopped"
        self.sparsity_cap = max(current, current + (rejected - current) / 2)
        self.retry_at = tick + (self.patience or 0)
        when = f"after {self.patience} more steps or " if self.patience is not None else ""
        if self.sparsity_cap - current < _MIN_CAP_GAP:
            return f"retry {when}at the next validation, once the model has recovered"
        return f"backing off: sparsity capped at {self.sparsity_cap:.3f}, retried {when}at the next validation"

    def capped_out(self, current: float) -> bool:
        """The cap leaves no room above ``current``: a retry is made only if the model has recovered."""
        return self.sparsity_cap is not None and self.sparsity_cap - current < _MIN_CAP_GAP

    # ------------------------------------------------------------------ summary
    def largest_accepted_drop(self) -> float | None:
        drops = [h["drop"] for h in self.history if h["accepted"] and h["drop"] is not None]
        return max(drops) if drops else None

    def rollbacks(self) -> int:
        return sum(not h["accepted"] for h in self.history)

    def shortfall(self, target: float | None, delivered: float) -> str | None:
        """When ``delivered`` falls short of ``target``: a sentence naming the refused events and why (None when
        the target was met, or there was none)."""
        if target is None or delivered >= target - SHORTFALL:
            return None
        refused = [h for h in self.history if not h["accepted"]]
        why = "; ".join(f"step {h['step']} (to {h['sparsity_tried']:.3f}): {h['reason']}" for h in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        cause = f"refused events: {why}{more}" if refused else "no event was refused (the schedule ended early)"
        return f"target sparsity {target:.2f}, delivered {delivered:.2f}: {cause}"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_tick": self.last_tick, "sparsity_cap": self.sparsity_cap, "backoffs": self.backoffs,
            "stopped": self.stopped, "initial_metric": self.initial_metric, "history": copy.deepcopy(self.history),
            "retry_at": self.retry_at, "refused": copy.deepcopy(self.refused), "deferred": self.deferred,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_tick = state.get("last_tick")
        self.sparsity_cap = state.get("sparsity_cap")
        self.backoffs = int(state.get("backoffs", 0))
        self.stopped = bool(state.get("stopped", False))
        self.initial_metric = state.get("initial_metric", state.get("baseline_metric"))
        self.history = list(state.get("history", []))
        self.retry_at = state.get("retry_at")
        self.refused = state.get("refused")
        self.deferred = bool(state.get("deferred", False))
