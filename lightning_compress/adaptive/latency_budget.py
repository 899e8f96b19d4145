"""``compress(model, Budget(latency=0.5, latency_input=(32, 1, 28, 28)), ...)``: remove whole units until the
model, compacted, runs in ``latency`` of the dense model's time in ONNX Runtime, with the smallest predicted loss
increase. No Lightning import.

1. Checks first (the model runs on ``latency_input``, ONNX Runtime is there), before any backward pass.
2. The unit analysis (:mod:`lightning_compress.structure.dependency`) says which sets of units can go and what
   shrinks with them; the diagonal Fisher scores every unit (:mod:`.units`); a per-layer latency table is measured
   (:mod:`.latency`).
3. Solve: from the dense model, repeatedly shrink the family whose next step costs the least predicted loss per
   predicted second saved (NetAdapt-style greedy; the latency of a layer depends on its own units *and* its
   producer's, so the costs do not add up per family and the knapsack of :mod:`.knapsack` does not apply), until
   the predicted latency is within the target.
4. Never trust: the model is compacted (:func:`~lightning_compress.structure.compaction.compact`, on a copy: the
   caller's model is not changed) and the compacted and the dense model are timed in turns. Over the budget, or well
   under it, the target is moved and the plan solved again (:func:`within`, at most :data:`CORRECTIONS` times). Then
   ``metric_fn`` decides. A model over budget or outside the bound is never returned:
   :class:`LatencyBudgetError` says the smallest latency fraction delivered within the bound, as measured.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.fisher import diagonal_fisher
from lightning_compress.adaptive.latency import LatencyTable, build_table, measured_ratio
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.adaptive.units import (
    LAYERS,
    UnitCandidate,
    families,
    family_candidates,
    unit_masks,
    unit_scores,
)
from lightning_compress.core.gate import MetricGate
from lightning_compress.serving._runtime import require_onnx
from lightning_compress.structure.compaction import compact
from lightning_compress.structure.dependency import UnitGroup, find_unit_groups
from lightning_compress.structure.macs import macs_per_example

CORRECTIONS = 4  # re-solves with the target moved by what was measured
AIM = 0.95  # plans aim at this share of the budget: timings on a loaded machine move by a few percent
CLOSE = 0.9  # a delivered model measured within [CLOSE, 1] of the budget is not loosened further
LOOSER = (1.1, 1.25, 1.5, 1.75)  # latency factors tried (below 1) to find one whose model holds the bound


class LatencyBudgetError(BudgetError):
    """The latency budget cannot be met, or not within the bound. ``smallest_latency``: the smallest fraction of
    the dense latency delivered (within the bound where one was given), as measured; None when none was."""

    def __init__(self, message: str, smallest_latency: float | None) -> None:
        super().__init__(message, None)
        self.smallest_latency = smallest_latency


@dataclass
class Delivered:
    plan: dict[str, UnitCandidate]
    model: nn.Module
    ratio: float  # measured latency / dense latency
    predicted: float  # predicted ratio
    seconds: float  # measured per run
    metric: float | None = None


def latency_shape(budget: Budget, batches: Sequence[Any]) -> tuple[int, ...]:
    """``budget.latency_input``, else the shape of the first calibration batch's input tensor."""
    if budget.latency_input is not None:
        return budget.latency_input
    first = batches[0]
    tensor = first if isinstance(first, Tensor) else first[0] if isinstance(first, (tuple, list)) and first else None
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise ValueError(f"a latency budget needs the input shape: give `latency_input` (e.g. (32, 1, 28, 28)); the "
                         f"first calibration batch holds no float input tensor to read it from "
                         f"({type(first).__name__})")
    return tuple(tensor.shape)


def check_latency_model(model: nn.Module, shape: tuple[int, ...]) -> None:
    """The model must run on one float input of ``shape`` (what ONNX Runtime is timed with)."""
    require_onnx()
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    except Exception as err:
        raise ValueError(f"`latency_input`={shape}: the model must run on one float tensor of that shape to be "
                         f"timed in ONNX Runtime, but it raised {type(err).__name__}: {err}") from None
    finally:
        model.train(training)


@dataclass
class LatencyProblem:
    """The candidates of each family, and how a plan's unit counts turn into each layer's (outputs, inputs)."""

    candidates: dict[str, list[UnitCandidate]]
    members: dict[str, list[str]]  # family -> its producers
    groups: Mapping[str, UnitGroup]
    scores: dict[str, Tensor]  # family -> per-unit predicted loss increase
    table: LatencyTable

    def sizes(self, plan: Mapping[str, UnitCandidate]) -> dict[str, tuple[int, int]]:
        sizes = {name: list(full) for name, full in self.table.full.items()}
        for name, candidate in plan.items():
            removed = candidate.units - candidate.kept
            for member in self.members[name]:
                if member in sizes:
                    sizes[member][0] = candidate.kept
            for consumer, repeat, _ in self.groups[name].consumers:
                if consumer in sizes:
                    sizes[consumer][1] -= removed * repeat
        return {name: (size[0], size[1]) for name, size in sizes.items()}

    def predict(self, plan: Mapping[str, UnitCandidate]) -> float:
        """Predicted seconds of the compacted model."""
        return self.table.predict(self.sizes(plan))

    def solve(self, target: float) -> dict[str, UnitCandidate]:
        """The greedy plan (module docstring): the first one predicted within ``target`` seconds, else the
        sparsest."""
        at = dict.fromkeys(self.candidates, 0)
        plan = {name: options[0] for name, options in self.candidates.items()}
        current = self.predict(plan)
        while current > target:
            best: tuple[float, float, str, float] | None = None  # (loss per second saved, loss, family, seconds)
            for name, options in self.candidates.items():
                if at[name] + 1 >= len(options):
                    continue
                saved = current - (seconds := self.predict({**plan, name: options[at[name] + 1]}))
                cost = options[at[name] + 1].score - options[at[name]].score
                step = (cost / saved if saved > 0 else float("inf"), cost, name, seconds)
                if best is None or step[:2] < best[:2]:
                    best = step
            if best is None:
                break  # every family at its fewest units
            _, _, name, current = best
            at[name] += 1
            plan[name] = self.candidates[name][at[name]]
        return plan


def problem_of(model: nn.Module, example: Tensor, shape: tuple[int, ...], threads: int, batches: Sequence[Any],
               forward: Callable[[nn.Module, Any], Any], loss_fn: Callable[[Any, Any], Tensor] | None
               ) -> LatencyProblem:
    """Unit analysis, Fisher scores per unit, candidates, and the latency table they need."""
    groups = find_unit_groups(model, example)
    members = families(groups)
    modules = dict(model.named_modules())
    weights = {n: m.weight for n, m in modules.items() if isinstance(m, LAYERS) and isinstance(m.weight, Tensor)}
    fisher = diagonal_fisher(model, weights, batches, forward, loss_fn)
    scores = {name: unit_scores(groups[name], family, modules, fisher) for name, family in members.items()}
    candidates = {name: family_candidates(name, scores[name]) for name in members}
    outputs: dict[str, list[int]] = {}
    inputs: dict[str, list[int]] = {}
    for name, options in candidates.items():
        for member in members[name]:
            outputs.setdefault(member, []).extend(c.kept for c in options)
        for consumer, repeat, _ in groups[name].consumers:
            if consumer in modules and isinstance(modules[consumer], LAYERS):
                fan_in = int(modules[consumer].weight.shape[1])
                inputs.setdefault(consumer, []).extend(fan_in - (c.units - c.kept) * repeat for c in options)
    return LatencyProblem(candidates, members, groups, scores, build_table(model, shape, threads, outputs, inputs))


def refresh_batchnorm(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (a plain average over them), the rest of the
    model in eval mode. Removing units changes what the later BatchNorms see; their dense statistics then shift
    every channel (adaptive BatchNorm, as EagleEye evaluates pruned candidates)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    model.eval()
    saved = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
        norm.train()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum
        model.eval()


def deliver(model: nn.Module, problem: LatencyProblem, plan: dict[str, UnitCandidate], example: Tensor,
            shape: tuple[int, ...], threads: int, batches: Sequence[Any] = (),
            forward: Callable[[nn.Module, Any], Any] | None = None) -> Delivered:
    """The compacted copy of ``model`` for ``plan`` (its BatchNorm statistics refreshed on ``batches`` when a unit
    was removed), timed against ``model`` in turns."""
    masks = unit_masks(plan, problem.scores, problem.members)
    compacted = compact(model, masks, example).model if masks else copy.deepcopy(model)
    if masks and batches and forward is not None:
        refresh_batchnorm(compacted, batches, forward)
    compacted.eval()
    ratio, _, seconds = measured_ratio(model, compacted, shape, threads)
    return Delivered(plan, compacted, ratio, problem.predict(plan) / problem.table.dense, seconds)


def within(model: nn.Module, problem: LatencyProblem, latency: float, example: Tensor, shape: tuple[int, ...],
           threads: int, steps: list[str], batches: Sequence[Any],
           forward: Callable[[nn.Module, Any], Any]) -> tuple[Delivered | None, float | None]:
    """The delivered model measured within ``latency`` (a fraction of the dense latency) with the smallest predicted
    loss, and the smallest fraction measured on the way (``steps`` says what was tried).

    The plan aims at :data:`AIM` of the budget (room for the timing's noise). Each measurement moves the target:
    scaled by budget / measured until one target's model was within the budget and another's over it, then the
    geometric mean of the two (a bisection), up to :data:`CORRECTIONS` times; a model measured within
    [:data:`CLOSE`, 1] of the budget ends it. When none is within the budget, the sparsest plan is measured last."""
    target = AIM * latency * problem.table.dense
    tried: dict[tuple[int, ...], Delivered] = {}
    passed: float | None = None  # the largest target whose model was within the budget
    failed: float | None = None  # the smallest target whose model was over it
    for _ in range(CORRECTIONS + 1):
        plan = problem.solve(target)
        key = tuple(c.kept for c in plan.values())
        if key not in tried:
            tried[key] = deliver(model, problem, plan, example, shape, threads, batches, forward)
            steps.append(f"latency {latency:g}: plan predicted {tried[key].predicted:.3f}x, measured "
                         f"{tried[key].ratio:.3f}x of dense ({tried[key].seconds * 1e3:.3g} ms per run)")
        ratio = tried[key].ratio
        if ratio <= latency:
            if ratio >= CLOSE * latency:
                break
            passed = target if passed is None else max(passed, target)
        else:
            failed = target if failed is None else min(failed, target)
        if passed is not None and failed is not None:
            target = (passed * failed) ** 0.5
        else:
            target *= AIM * latency / ratio
    sparsest = problem.solve(0.0)
    key = tuple(c.kept for c in sparsest.values())
    if all(d.ratio > latency for d in tried.values()) and key not in tried:
        tried[key] = deliver(model, problem, sparsest, example, shape, threads, batches, forward)
        steps.append(f"every family at its fewest units: measured {tried[key].ratio:.3f}x of dense")
    passing = [d for d in tried.values() if d.ratio <= latency]
    best = min(passing, key=lambda d: sum(c.score for c in d.plan.values()), default=None)
    return best, min((d.ratio for d in tried.values()), default=None)


def compress_to_latency(model: nn.Module, budget: Budget, batches: Sequence[Any],
                        forward: Callable[[nn.Module, Any], Any], loss_fn: Callable[[Any, Any], Tensor] | None,
                        metric_fn: Callable[[nn.Module], float] | None, measure: Callable[..., float],
                        gate: MetricGate) -> tuple[Delivered, LatencyProblem, dict[str, Any]]:
    """The delivered (compacted) model within the latency budget and the bound, its problem, and the report's
    figures (``before``, ``evaluations``, ``steps``); raises :class:`LatencyBudgetError` otherwise."""
    if budget.latency is None:
        raise ValueError(f"`budget`={budget!r} has no `latency`; compress() takes size / MACs budgets elsewhere")
    shape = latency_shape(budget, batches)
    check_latency_model(model, shape)
    threads = budget.latency_threads
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    steps: list[str] = []
    before = measure(metric_fn, model) if metric_fn is not None else None
    evaluations = int(metric_fn is not None)
    problem = problem_of(model, example, shape, threads, batches, forward, loss_fn)
    steps.append(f"{len(problem.candidates)} families of units, {problem.table.graphs} one-layer graphs timed; dense "
                 f"{problem.table.dense * 1e3:.3g} ms per run at {shape}, {threads} thread(s)")
    passing: float | None = None
    for factor in (1.0, *LOOSER):
        latency = budget.latency * factor
        if latency >= 1.0:
            break
        delivered, smallest = within(model, problem, latency, example, shape, threads, steps, batches, forward)
        if delivered is None:
            if factor == 1.0:
                raise LatencyBudgetError(
                    f"`budget` latency={budget.latency!r}: no plan runs that fast as measured in ONNX Runtime at "
                    f"{shape} with {threads} thread(s); the smallest fraction delivered was {smallest:.3f} of the "
                    f"dense latency; allowed: at least that (steps: {steps})", smallest)
            continue
        if metric_fn is not None:
            delivered.metric = measure(metric_fn, delivered.model)
            evaluations += 1
            verdict = gate.judge(before, delivered.metric)
            steps.append(f"metric {delivered.metric:.6g} (drop {verdict.drop})")
            if not verdict.accepted:
                continue
        if factor == 1.0:
            return delivered, problem, {"before": before, "evaluations": evaluations, "steps": steps}
        passing = delivered.ratio
        break
    nearest = "no looser budget up to 1 met it either" if passing is None else \
        f"the smallest budget that met it as measured: latency={passing:.3f}"
    raise LatencyBudgetError(f"`budget` latency={budget.latency!r} and `max_metric_drop`={gate.max_drop} cannot both "
                             f"hold (measured after {evaluations} evaluations); {nearest}; allowed: a larger latency "
                             f"or a looser bound (steps: {steps})", passing)


def plan_rows(problem: LatencyProblem, plan: Mapping[str, UnitCandidate]) -> list[dict[str, Any]]:
    """The plan as a table: per family, its producers, units kept of all, and the predicted loss increase."""
    return [{"layer": name, "members": problem.members[name], "units": c.units, "kept": c.kept,
             "predicted": c.score, "label": f"{c.kept}/{c.units} units"} for name, c in plan.items()]


def latency_result(model: nn.Module, budget: Budget, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any],
                   loss_fn: Callable[[Any, Any], Tensor] | None, metric_fn: Callable[[nn.Module], float] | None,
                   measure: Callable[..., float], gate: MetricGate) -> Any:
    """:func:`compress_to_latency` as a :class:`~lightning_compress.adaptive.compress.CompressionResult`; its
    ``model`` is the compacted copy (``model`` itself is not changed)."""
    from lightning_compress.adaptive.compress import CompressionResult  # compress imports this module

    delivered, problem, report = compress_to_latency(model, budget, batches, forward, loss_fn, metric_fn, measure,
                                                     gate)
    shape = latency_shape(budget, batches)
    macs = macs_per_example(delivered.model, torch.zeros(shape))
    return CompressionResult(delivered.model, plan_rows(problem, delivered.plan), None, None, None, macs,
                             report["before"], delivered.metric, report["evaluations"], report["steps"],
                             budget_latency=budget.latency, latency=delivered.ratio)
