"""A latency budget inside a fit: whole units pruned while training (the training recovers what they cost), each
family ramping to its own planned count, the model compacted at the end and its latency measured. The pure half of
``AdaptiveCompression(budget=Budget(latency=...))``; no Lightning import.

- :class:`~.unit_planner.LatencyPlanner` (:mod:`.unit_planner`): per family, the kept unit count planned for the
  budget from the per-unit statistics and a latency table measured once; a fit resumed after its last event has it
  built again from the run's structure when the run first needs its families (:meth:`LatencyRun._families`).
- Each family aims at ``units - (units - planned) * progress`` (the schedule's progress, 0 -> 1). At the last event
  (progress 1) the plan is not trusted: :func:`~.latency_budget.within` compacts copies and times them against the
  model in turns, moving the target until a plan is measured within the budget (the same corrections as
  ``compress()``), and that plan's counts are pruned.
- The metric gate (``max_metric_drop``) is deferred (:mod:`.recovery_gate`): whole units cost several points right
  after an event, which training then recovers, so :meth:`LatencyRun.event` holds each event and judges the events
  held once the model has trained since (a later validation, or the schedule's next event after one), undoing
  them when outside the bound and capping their families; the event still held at the end of the fit is judged by
  :func:`settle_last` before compaction, and :func:`verify_bound` checks the compacted model against the bound on
  the validation data before anything is written (:class:`~.session.BudgetError` otherwise).
- :func:`verify`: after the fit the compacted model is timed against the dense graph kept at the start; the budget
  holds when the median of alternated runs (:func:`~.latency.measure`, one timing, no retry) is within it. Otherwise
  :class:`~.latency_budget.LatencyBudgetError` with the measured fraction (the nearest budget this fit delivered).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.adaptive.in_fit import from_rank_zero, shortfall
from lightning_compress.adaptive.latency import ROUNDS, float_graph, measure
from lightning_compress.adaptive.latency_budget import LatencyBudgetError
from lightning_compress.adaptive.recovery_gate import RecoveryGate
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.adaptive.unit_planner import LatencyPlanner, table_from_state, table_state, unit_fisher
from lightning_compress.pruning.planner import expand_masks
from lightning_compress.pruning.run import PruningRun, check_finite_before

__all__ = ["LatencyPlanner", "LatencyRun", "settle_last", "shortfall", "unit_fisher", "verify", "verify_bound"]

VERIFY_ROUNDS = 2 * ROUNDS  # the delivered model is timed once, for longer than a plan's candidates


def kept_now(units: int, planned: int, progress: float, kept: int) -> int:
    """The count a family keeps at ``progress`` of its ramp from ``units`` to ``planned``, never above ``kept``."""
    return min(kept, units - int(round((units - planned) * min(1.0, max(0.0, progress)))))


class LatencyRun(PruningRun):
    """The fit's structured pruning toward per-family kept counts (module docstring). ``planner`` and ``broadcast``
    (every rank takes rank zero's plans and timings) are set when the fit starts; ``schedule`` ramps progress from
    0 to 1."""

    broadcast: Callable[[Any], Any] = staticmethod(lambda plan: plan)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._planner: LatencyPlanner | None = None
        self._restored: dict[str, Any] = {}  # a checkpoint's latency table and last-event seconds, for the planner
        self.kept_plan: dict[str, int] = {}
        self.planned_at: int | None = None
        self.progress, self.replans = 0.0, 0
        self.recovery = RecoveryGate()  # each event judged after the model trained since (adaptive.recovery_gate)

    @property
    def planner(self) -> LatencyPlanner | None:
        return self._planner

    @planner.setter
    def planner(self, planner: LatencyPlanner | None) -> None:
        """Set when the fit starts (after a checkpoint was loaded): it takes the checkpoint's latency table and
        last-event seconds, so a resumed fit times no table again."""
        self._planner = planner
        if isinstance(planner, LatencyPlanner) and self._restored:
            planner.table = table_from_state(self._restored.get("latency_table"))
            planner.final_target = self._restored.get("final_target")

    def _families(self) -> dict[str, list[str]]:
        """Family -> its members, from the planner's problem. A fit resumed after its last event has a kept plan
        (and maybe held events) but no problem yet, since no event built it: built now (:meth:`LatencyPlanner.build`,
        the latency table and the dense graph timed again), so the end of the fit finds the families its plan
        names and the dense graph it is timed against."""
        planner = self.planner
        if planner is None:
            return {}
        if planner.problem is None and (self.kept_plan or self.recovery.held) and self.state.groups:
            planner.build(self.layers.names, self.state.groups)
        return planner.problem.members if planner.problem else {}

    def _kept(self, family: list[str]) -> tuple[int, int]:
        """(units, kept now) of a family."""
        mask = self.state.unit_masks.get(family[0])
        units = self.state.groups[family[0]].num_units  # type: ignore[index]
        return units, units if mask is None else int(mask.bool().sum())

    def _targets(self) -> dict[str, int]:
        out = {}
        for name, family in self._families().items():
            units, kept = self._kept(family)
            out[name] = kept_now(units, self.kept_plan.get(name, units), self.progress, kept)
        return out

    def _target(self, tick: int) -> float | None:
        if self.schedule is None or self.planner is None:
            return None
        progress = self.schedule.target_by(tick)
        if progress is None:
            return None
        if tick != self.planned_at and self.stats is not None and self.stats.count > 0 and self.state.groups:
            self.planned_at, self.progress = tick, float(progress)
            fisher = dict(zip(self.stats.names, self.stats.unit_taylor_second_moment()))
            plan = self.planner(self.layers.names, self.state.groups, fisher, self.state.unit_masks,
                                final=progress >= 1.0, caps=self.recovery.caps)
            self.kept_plan = {n: int(k) for n, k in plan.items()}  # rank zero's (the planner shares it)
            self.replans += 1
        families, targets = self._families(), self._targets()
        total = sum(self._kept(f)[0] for f in families.values())
        removed = sum(self._kept(f)[0] - targets[n] for n, f in families.items())
        target = removed / max(total, 1)
        cap = self.controller.sparsity_cap
        return target if cap is None else min(target, cap)

    def event(self, tick: int, step: int, evaluate: Callable[[], float | None],
              broadcast: Callable[[Any], Any] = lambda masks: masks,
              optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, Any] | None:
        """One event, its gate deferred (:mod:`~lightning_compress.adaptive.recovery_gate`). At least a
        schedule's interval after the newest held event, right after a validation (``validated``: its metric, no
        extra pass), or at a schedule's event once a validation came after the newest held one (``validated_at``:
        the fit validates as often as it prunes, and the validation right after an event measures none of its
        recovery), or ``patience`` ticks after it when set, the events held are judged by the metric measured
        then, and undone when outside the bound (their families capped, the plan solved again); the schedule's
        events in between are pruned and held with the others, unmeasured.
        Then the step the plan asks for is pruned and held, kept until its verdict. Held events ask for a retry
        (the controller's ``retry_at``), so a validation comes back here even after the schedule's last event:
        undone then, the rest of the units is pruned again with the caps (held in turn). Returns the history
        entry of the new step, or of the undone ones when no step follows."""
        held, undone = self.recovery.held, None
        scheduled = self.schedule is not None and self.schedule.is_event(tick)
        since = tick - held[-1].tick if held else 0
        patience = self.controller.patience
        seen = bool(held) and self.validated_at is not None and self.validated_at >= held[-1].tick
        interval = since >= (getattr(self.schedule, "frequency", 1) or 1) and (self.validated or (scheduled and seen))
        judge = bool(held) and (interval or (patience is not None and since >= patience))
        if held and not judge and not scheduled:
            return None  # a validation too soon after the newest event: a later one judges it
        before = None
        if judge or self.controller.initial_metric is None:  # the metric a validation measured (or the reference)
            before = evaluate()
        check_finite_before(self.state.model, step, before)
        if judge:
            undone = self.settle(before)
            self.planned_at = None  # the plan again, now (with the caps of undone events)
        target = self._target(tick)
        if target is None or not self._prunes():
            self.controller.retry_at = self.controller.retry_at if self.recovery.held else None
            return undone
        reference = self.controller.reference_for(before)
        families = self._families()
        kept_before = {n: self._kept(f)[1] for n, f in families.items()}
        before_sparsity = self.state.sparsity()
        undo = self.state.try_masks(*broadcast(self.plan(target)))
        kept_after = {n: self._kept(f)[1] for n, f in families.items()}
        judged = self.controller.gate.max_drop is not None and reference is not None  # else every verdict keeps
        if judged:
            self.recovery.hold(self.state, undo, families, kept_before, kept_after, tick, step, reference)
        self.controller.conclude(tick=tick, step=step, metric_before=before, metric_after=None, weights_finite=True,
                                 sparsity_before=before_sparsity, sparsity_tried=self.state.sparsity(),
                                 extra={"weight_sparsity": self.state.weight_sparsity()})
        self.state.keep(optimizers)
        # a validation comes back to judge it
        self.controller.retry_at = tick + (self.controller.patience or 0) if self.recovery.held else None
        if self.config.restart_statistics and self.stats is not None:
            self.stats.reset()
        entry = self.controller.history[-1]
        said = "held: judged after recovery (at a later validation or the end of the fit)" if judged else \
            "kept: no bound (max_metric_drop=None) or no metric to judge it by, so nothing is held"
        entry["note"] = "; ".join(filter(None, [entry["note"], said, undone["note"] if undone else ""]))
        return entry

    def _prunes(self) -> bool:
        """Whether the targets now remove a unit somewhere (the overall fraction of units can fall while a plan
        with capped families removes costlier units elsewhere)."""
        return any(self._targets()[n] < self._kept(f)[1] for n, f in self._families().items())

    def settle(self, metric: float | None) -> dict[str, Any] | None:
        """The held events judged by ``metric`` (the model trained since): kept, or undone (a history entry,
        refused, is returned; None otherwise)."""
        held_sparsity = self.state.sparsity()
        settled = self.recovery.settle(self.state, self.controller.gate, metric, self._families())
        if settled is None or settled[0].accepted:
            return None
        verdict, held = settled
        self.controller.history.append({
            "tick": held[-1].tick, "step": held[-1].step, "metric_before": None, "metric_after": metric,
            "reference": held[0].reference, "drop": verdict.drop, "sparsity_tried": held_sparsity,
            "sparsity": self.state.sparsity(), "accepted": False,
            "reason": f"after recovery: {verdict.reason}", "note": self.recovery.log[-1],
            "weight_sparsity": self.state.weight_sparsity(),
        })
        return self.controller.history[-1]

    def plan(self, target: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
        assert self.planner is not None and self.planner.problem is not None
        problem, units = self.planner.problem, {}
        for name, kept in self._targets().items():
            order = torch.argsort(-problem.scores[name].float(), stable=True)
            mask = torch.zeros(order.numel(), dtype=torch.bool)
            mask[order[:kept]] = True
            for member in problem.members[name]:
                units[member] = mask.clone()
        return expand_masks(self.state.model, units, self.state.groups), units

    @property
    def plan_by_layer(self) -> dict[str, float]:
        return {m: 1.0 - kept / self.state.groups[n].num_units  # type: ignore[index]
                for n, kept in self.kept_plan.items() for m in self._families()[n]}

    def reached(self) -> dict[str, float]:
        return {m: 1.0 - self._kept(f)[1] / self._kept(f)[0] for f in self._families().values() for m in f}

    def state_dict(self) -> dict[str, Any]:
        planner = self._planner if isinstance(self._planner, LatencyPlanner) else None
        restored = self._restored if planner is None else {
            "latency_table": table_state(planner.table), "final_target": planner.final_target}
        return {**super().state_dict(), "kept_plan": dict(self.kept_plan), "planned_at": self.planned_at,
                "progress": self.progress, "replans": self.replans, "recovery": self.recovery.state_dict(),
                **restored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kept_plan = {str(n): int(k) for n, k in dict(state.get("kept_plan", {})).items()}
        self.planned_at, self.replans = state.get("planned_at"), int(state.get("replans", 0))
        self.progress = float(state.get("progress", 0.0))
        self.recovery.load_state_dict(state.get("recovery", {}))
        self._restored = {k: state.get(k) for k in ("latency_table", "final_target")}
        self.planner = self._planner  # one already set takes them now


def verify(planner: LatencyPlanner, model: nn.Module, share: Callable[[Any], Any] = lambda pair: pair,
           serve: Callable[[nn.Module], bytes] | None = None, refuse: bool = True,
           what: str = "delivered (compacted)") -> float:
    """``model`` (compacted; ``serve(model)``: the ONNX graph it is served as, default its float graph) timed against
    the dense graph kept at the start, in turns: the measured fraction. Only rank zero, which kept the dense graph,
    exports and times; ``share`` (the broadcast) gives every rank its fraction, or its error
    (:func:`~.in_fit.from_rank_zero`). One timing of :data:`VERIFY_ROUNDS` alternated runs decides (a burst of load
    from another process moves a short one by several percent; the plan aimed at :data:`~.latency_budget.AIM` of
    the budget): a second timing taken only after one over the budget, the second deciding, accepted a model at the
    budget about three times in four and reported the lucky figure. Raises :class:`LatencyBudgetError` when it is
    over the budget (``refuse``; else the fraction is returned as measured)."""
    if planner.problem is None:
        raise LatencyBudgetError(f"`budget` latency={planner.latency!r}: no pruning event ran in this fit (the "
                                 "schedule's events fall after its last step?), so nothing was removed; allowed: a "
                                 "schedule whose events happen during the fit", 1.0)

    def timed() -> tuple[float, str]:
        if planner.dense_graph is None:
            return math.nan, "no dense graph kept"
        shapes = {"dense": planner.shape, "model": planner.shape}
        graphs = {"dense": planner.dense_graph,
                  "model": serve(model) if serve is not None else float_graph(model, planner.shape)}
        seconds = measure(graphs, shapes, planner.threads, rounds=VERIFY_ROUNDS)
        return seconds["model"] / seconds["dense"], f"{seconds['model'] * 1e3:.3g} vs {seconds['dense'] * 1e3:.3g} " \
            f"ms per run, medians of {VERIFY_ROUNDS} alternated runs"

    measured, said = from_rank_zero(share, timed, f"the timing of the {what} model")
    ratio = float(measured)
    planner.steps.append(f"{what} measured {ratio:.3f}x of dense ({said})")
    if refuse and ratio > planner.latency:
        raise LatencyBudgetError(f"`budget` latency={planner.latency!r}: the model this fit compacted measured "
                                 f"{ratio:.3f} of the dense latency in ONNX Runtime at {planner.shape} (refused "
                                 f"pruning events or the timing's noise); the nearest budget it delivers: "
                                 f"latency={ratio:.3f} (steps: {planner.steps})", ratio)
    return ratio


def latency_setup(model: nn.Module, budget: Any) -> tuple[int, ...]:
    """The shape a latency budget is timed at (``budget.latency_input``, else the model's ``example_input_array``),
    checked to run, export to ONNX and open in ONNX Runtime, before any training step."""
    from lightning_compress.adaptive.latency_budget import check_latency_model

    shape = budget.latency_input
    example = getattr(model, "example_input_array", None)
    if shape is None and isinstance(example, Tensor):
        shape = tuple(example.shape)
    if shape is None:
        raise ValueError(f"`budget` latency={budget.latency!r} is timed at one input shape: give `latency_input` "
                         "(e.g. (32, 1, 28, 28)) or set the model's `example_input_array`")
    check_latency_model(model, tuple(shape))
    return tuple(shape)


def finish_latency(callback: Any, trainer: Any, model: nn.Module) -> None:
    """After the fit compacted ``model``: its latency measured against the budget (:func:`verify`) and the report's
    entry (the callback writes the export: every rank must hear of a failed write). Float weights: int8 is not
    timed by the serving path here, so the delivered model is the compacted float one."""
    from lightning_compress.reporting.records import CompressionEvent

    run = callback.run
    planner = run.planner
    entry = callback.report.gate.setdefault(callback.report_name, {})
    entry.update(recovery_gate=list(run.recovery.log), capped_families=dict(run.recovery.caps))
    ratio = verify(planner, model, run.broadcast)
    initial, metric = run.controller.initial_metric, verify_bound(callback, trainer, model, planner.steps)
    entry.update(budget={"latency": planner.latency, "latency_input": list(planner.shape),
                         "threads": planner.threads},
                 delivered={"latency": ratio, "kept_units": dict(run.kept_plan), "metric": metric},
                 verification_steps=planner.steps, replans=run.replans,
                 quantization="none: the compacted float model (int8 latency is not planned)")
    note = f"latency budget {planner.latency:g}: delivered {ratio:.3f}x of dense; " + "; ".join(planner.steps)
    callback.report.events.append(CompressionEvent("compact", trainer.global_step, initial, metric, note=note,
                                                   reference=initial, drop=callback.gate.drop(initial, metric)))


def settle_last(callback: Any, trainer: Any, model: nn.Module) -> None:
    """Before the masks are frozen and the model compacted: the event still held judged by the metric now (after
    the rest of the fit), undone when outside the bound; the verdict goes into the report's events."""
    run = callback.run
    if not isinstance(run, LatencyRun) or not run.recovery.held:
        return
    metric = callback._evaluate(trainer, model) if callback.max_metric_drop is not None else None
    entry = run.settle(metric)
    if entry is not None:
        callback._record(trainer, model, entry, loggable=False)


def verify_bound(callback: Any, trainer: Any, model: nn.Module, steps: list[str]) -> float | None:
    """The delivered (compacted) model's metric on the validation data, measured now, before anything is written;
    raises :class:`~.session.BudgetError` when it is outside the bound of the metric before the first event."""
    if callback.max_metric_drop is None or not callback._has_val:
        return None
    initial = callback.run.controller.initial_metric
    metric = callback._evaluate(trainer, model)
    verdict = callback.gate.judge(initial, metric)
    drop = "not measured" if verdict.drop is None else f"{verdict.drop:.4g}"
    steps.append(f"delivered (compacted) metric {metric!r} against {initial!r} before the first event: drop {drop}")
    if not verdict.accepted:
        raise BudgetError(f"`max_metric_drop`={callback.max_metric_drop!r}: the model this fit compacted for the "
                          f"latency budget measured {metric!r} on the validation data against {initial!r} before "
                          f"pruning ({verdict.reason}); nothing is exported; allowed: a larger latency budget or "
                          f"max_metric_drop, or a longer fit after the last event (steps: {steps})", None)
    return metric
