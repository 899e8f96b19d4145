"""``compress(model, Budget(latency=0.5, latency_input=(32, 1, 28, 28)), ...)``: remove whole units and run
layers on int8 kernels until the model, compacted, runs in ``latency`` of the dense model's time in ONNX Runtime,
with the smallest predicted loss increase; with ``size`` / ``macs`` in the same budget, its file and MACs are
capped too. No Lightning import.

1. Checks first (the model runs on ``latency_input``, ONNX Runtime is there, a size / MACs cap above the model's
   floor: :func:`~.caps.budget_caps`), before any backward pass.
2. The unit analysis (:mod:`lightning_compress.structure.dependency`) says which sets of units can go and what
   shrinks with them; the diagonal Fisher scores every unit (:mod:`.units`) and every layer's int8 codes
   (:mod:`.int8_latency`); a per-layer latency table is measured, float and int8 (:mod:`.latency`).
3. Solve (:mod:`.latency_plan`): from the dense float model, repeatedly take the move (a family's next units, or
   one layer to int8) that costs the least predicted loss per predicted progress towards the targets (NetAdapt-style
   greedy; the latency of a layer depends on its own units *and* its producer's, so the costs do not add up per
   family and the knapsack of :mod:`.knapsack` does not apply). ``search="sparsity"``: units only (float);
   ``"bits"``: int8 only.
4. Never trust (:mod:`.latency_delivery` builds the problem and each delivery): the model is compacted
   (:func:`~lightning_compress.structure.compaction.compact`, on a copy: the caller's model is not changed), its
   int8 layers quantized (it carries their codes), and the graph ``export_onnx(..., activations="static")`` writes
   of it is timed in turns with the dense float graph; its file (``save_quantized``, or ``save_float`` when no
   layer is int8) and MACs are measured. Over a cap, or well under
   the latency, the targets are moved and the plan solved again (:func:`within`, at most :data:`CORRECTIONS`
   times). Then ``metric_fn`` decides, on what was timed: the delivered model carries the uint8 input range each
   int8 layer was exported with, and ``metric_fn`` runs with those inputs fake-quantized
   (:func:`~.int8_latency.as_served`: the static graph's arithmetic, up to rounding at uint8 steps; the export's
   agreement with it is in the steps). A model over budget or outside the bound is never returned:
   :class:`LatencyBudgetError` says the smallest latency fraction delivered within the bound, as measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.adaptive import latency_delivery
from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.caps import budget_caps
from lightning_compress.adaptive.int8_latency import as_served, calibration_inputs
from lightning_compress.adaptive.latency import Timings, float_graph
from lightning_compress.adaptive.latency_delivery import Delivered, deliver, problem_of, refresh_batchnorm
from lightning_compress.adaptive.latency_plan import LatencyProblem, Targets
from lightning_compress.adaptive.latency_rows import budget_text, plan_rows, stored_bits
from lightning_compress.adaptive.latency_widths import Widths, plan_widths
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.adaptive.units import UnitCandidate
from lightning_compress.core.gate import MetricGate
from lightning_compress.serving._runtime import require_onnx, session
from lightning_compress.structure.macs import macs_per_example

__all__ = ["Delivered", "LatencyBudgetError", "LatencyProblem", "compress_to_latency", "deliver", "latency_result",
           "problem_of", "refresh_batchnorm", "refuse_ignored", "within"]

Narrow = Callable[[nn.Module, frozenset[str], float], Widths | None]  # (compacted copy, int8 layers, bytes target)
JUDGED = 3  # plans measured within one budget that the bound may judge, by predicted loss
WIDER = 2.0  # the widths' third plan: units and int8 for twice the bytes (int8's byte a weight, about 4 bits' half)
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


def refuse_ignored(budget: Budget, given: Mapping[str, tuple[Any, Any]]) -> None:
    """Raise naming each of ``compress()``'s arguments in ``given`` (name -> (value, its default)) set other than
    its default: they choose a size / MACs plan (widths, their clipping, corrections, the scores' scale, the
    measured ``before``, the Fisher's sync), and the latency path would silently ignore them."""
    ignored = {name: default for name, (value, default) in given.items() if value is not default and value != default}
    if ignored:
        set_to = ", ".join(f"`{name}`={given[name][0]!r}" for name in ignored)
        defaults = ", ".join(f"`{name}`={default!r}" for name, default in ignored.items())
        raise ValueError(f"`budget`=Budget(latency={budget.latency!r}, ...) removes whole units and rounds its int8 "
                         f"layers to nearest: {set_to} would be ignored (they belong to size / MACs budgets); a "
                         f"latency budget takes calibration_data, forward, loss_fn, metric_fn, max_metric_drop, "
                         f"higher_is_better, calibration_batches and search; allowed: {defaults}")


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
    """The model must run on one float input of ``shape``, export to ONNX at that shape and open in ONNX Runtime:
    what is timed. Checked once, before any training step or backward pass (a model ONNX cannot export used to
    pass here and fail at the first pruning event, or after compress()'s Fisher)."""
    _, ort = require_onnx()
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
    try:
        session(float_graph(model, shape), ort)
    except Exception as err:
        said = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"`budget` with a latency is timed on the model's ONNX graph in ONNX Runtime (input "
                         f"`latency_input`={shape}), but {type(model).__name__} cannot be exported or opened there: "
                         f"{type(err).__name__}: {said[:300]}; allowed: a model whose operators export to ONNX "
                         f"(opset 17) and run in ONNX Runtime, or a size / MACs budget") from None


def within(model: nn.Module, problem: LatencyProblem, latency: float, example: Tensor, shape: tuple[int, ...],
           threads: int, steps: list[str], batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any], *,
           caps: tuple[int | None, int | None] = (None, None), int8: bool = False, timings: Timings | None = None,
           narrow: Narrow | None = None, also: list[Delivered] | None = None) -> tuple[Delivered | None, float | None]:
    """The delivered model measured within ``latency`` (a fraction of the dense latency) and ``caps`` (file bytes,
    MACs per example; None: no cap) with the smallest predicted loss, and the smallest fraction measured on the way
    (``steps`` says what was tried). ``int8``: layers may be chosen int8. ``timings``: what times the graphs
    (:func:`~.latency.build_table`'s). ``narrow``: the widths of a plan for the bytes target (:func:`_measure`);
    ``also``: receives the next passing plans by predicted loss (up to :data:`JUDGED` in all), for the bound to
    judge when the best fails it (the Fisher prices narrow codes and removed units differently).

    The plan aims at :data:`AIM` of the latency (room for the timing's noise). Each measurement moves the latency
    target: scaled by budget / measured until one target's model was within the budget and another's over it, then
    the geometric mean of the two (a bisection), up to :data:`CORRECTIONS` times; a file or a MACs count measured
    over its cap scales that target by cap / measured (both are measured exactly: no aim). A model within every cap
    and within [:data:`CLOSE`, 1] of the latency ends it. When none is within, the sparsest plan is measured last."""
    count = caps != (None, None)
    target = AIM * latency * problem.table.dense  # seconds
    others: list[float | None] = [None if cap is None else float(cap) for cap in caps]  # bytes, MACs
    tried: dict[tuple[Any, ...], Delivered] = {}
    passed: float | None = None  # the largest latency target whose model was within the budget
    failed: float | None = None  # the smallest latency target whose model was over it
    for _ in range(CORRECTIONS + 1):
        delivered = _measure(model, problem, (target, others[0], others[1]), int8, tried, example, shape, threads,
                             batches, forward, count, steps, latency, timings, narrow)
        for index, (cap, value) in enumerate(zip(caps, (delivered.file_bytes, delivered.macs))):
            now = others[index]
            if cap is not None and value is not None and now is not None and value > cap:
                others[index] = now * cap / value * 0.99
        ratio = delivered.ratio
        if ratio <= latency:
            if ratio >= CLOSE * latency and delivered.fits(1.0, caps):
                break
            passed = target if passed is None else max(passed, target)
        else:
            failed = target if failed is None else min(failed, target)
        if passed is not None and failed is not None:
            target = (passed * failed) ** 0.5
        else:
            target *= AIM * latency / ratio
    if not any(d.fits(latency, caps) for d in tried.values()):
        sparsest = (0.0, None if caps[0] is None else 0.0, None if caps[1] is None else 0.0)
        before = len(tried)
        last = _measure(model, problem, sparsest, int8, tried, example, shape, threads, batches, forward, count,
                        steps, latency, timings, narrow)
        if len(tried) > before:
            steps.append(f"the sparsest plan: measured {last.ratio:.3f}x of dense")
    passing = sorted((d for d in tried.values() if d.fits(latency, caps)), key=lambda d: d.loss)
    best = passing[0] if passing else None
    if also is not None:  # the next ones by predicted loss, for the bound
        also.extend(passing[1:JUDGED])
    return best, min((d.ratio for d in tried.values()), default=None)


def _measure(model: nn.Module, problem: LatencyProblem, targets: Targets, int8: bool,
             tried: dict[tuple[Any, ...], Delivered], example: Tensor, shape: tuple[int, ...], threads: int,
             batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any], count: bool, steps: list[str],
             latency: float, timings: Timings | None, narrow: Narrow | None = None) -> Delivered:
    """The plan solved for ``targets``, delivered and measured once (``tried`` keeps what was). With ``narrow`` (a
    size cap, int8 allowed) and a plan that the bytes target cost something (predicted over it, or its units / int8
    differ from the plan for the seconds and MACs alone): the plan for the seconds and MACs alone with its widths
    chosen for the bytes target (:mod:`.latency_widths`) is delivered too, and returned where the plan is predicted
    over the targets or the widths are predicted to cost no more loss (the plan, predicted within them, is then
    delivered too, for the bound to judge if the widths fail it); so is the plan for the seconds, MACs and
    :data:`WIDER` times the bytes (some units removed for the bytes, milder widths), and a plan predicted over the
    targets with its own int8 layers narrowed; the one with the least predicted loss is returned."""
    plan, layers = problem.solve_joint(targets, int8_allowed=int8)
    if narrow is not None and targets[1] is not None:
        fast, fast_int8 = problem.solve_joint((targets[0], None, targets[2]), int8_allowed=int8)
        over = problem.over(plan, layers, targets)
        size = targets[1]
        halfway = problem.solve_joint((targets[0], WIDER * size, targets[2]), int8_allowed=int8)
        options = [o for i, o in enumerate(((fast, fast_int8), halfway)) if o != (plan, layers) and
                   (i == 0 or o != (fast, fast_int8))]
        narrowed = [d for units, int8_layers in options + ([(plan, layers)] if over > 0 else [])
                 if (d := _delivered(model, problem, units, int8_layers, tried, example, shape, threads, batches,
                                     forward, count, steps, latency, timings,
                                     lambda copy, chosen: narrow(copy, chosen, size))) is not None]
        mixed = min(narrowed, key=lambda d: d.loss, default=None)
        if mixed is not None and (over > 0 or mixed.loss <= problem.loss(plan, layers)):
            if over == 0:  # measured too: the bound may refuse the widths and take it (``within``'s ``also``)
                _delivered(model, problem, plan, layers, tried, example, shape, threads, batches, forward, count,
                           steps, latency, timings)
            return mixed
    found = _delivered(model, problem, plan, layers, tried, example, shape, threads, batches, forward, count, steps,
                       latency, timings)
    assert found is not None  # only a widths plan can find none
    return found


def _delivered(model: nn.Module, problem: LatencyProblem, plan: dict[str, UnitCandidate], layers: frozenset[str],
               tried: dict[tuple[Any, ...], Delivered], example: Tensor, shape: tuple[int, ...], threads: int,
               batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any], count: bool, steps: list[str],
               latency: float, timings: Timings | None,
               widths: Callable[[nn.Module, frozenset[str]], Widths | None] | None = None) -> Delivered | None:
    """``plan`` with ``layers`` int8 (and ``widths``' widths) delivered and measured, or taken from ``tried``."""
    key = (*(c.kept for c in plan.values()), *sorted(layers))
    if widths is None and key in tried:
        return tried[key]
    found = deliver(model, problem, plan, example, shape, threads, batches, forward, layers, count, timings, widths)
    if found is None:
        said = f"latency {latency:g}: no widths on the plan for the latency alone (int8 {sorted(layers)}) fit the " \
            "bytes target"
        if said not in steps:
            steps.append(said)
        return None
    tried[(*key, "widths", *sorted(found.widths.items())) if widths is not None else key] = found
    where = f", int8 {sorted(layers)}" if layers else ""
    where += f", widths {found.widths}" if found.widths else ""
    steps.append(f"latency {latency:g}: plan predicted {found.predicted:.3f}x{where}, measured {found.ratio:.3f}x "
                 f"of dense ({found.seconds * 1e3:.3g} ms per run){found.note}")
    return found


def compress_to_latency(model: nn.Module, budget: Budget, batches: Sequence[Any],
                        forward: Callable[[nn.Module, Any], Any], loss_fn: Callable[[Any, Any], Tensor] | None,
                        metric_fn: Callable[[nn.Module], float] | None, measure: Callable[..., float],
                        gate: MetricGate, search: str = "joint", before: float | None = None,
                        timings: Timings | None = None) -> tuple[Delivered, LatencyProblem, dict[str, Any]]:
    """The delivered (compacted, partly int8) model within the latency budget, the size / MACs caps and the bound,
    its problem, and the report's figures (``before``, ``evaluations``, ``steps``, ``caps``); raises
    :class:`LatencyBudgetError` otherwise. ``search``: ``"sparsity"`` units only (float), ``"bits"`` int8 only,
    otherwise both. ``before``: ``metric_fn(model)`` the caller measured already (a fit: on the compacted model,
    with the bound left after pruning), not measured again. ``timings``: what times every ONNX graph (default
    :func:`~.latency.measure`; a fit passes rank zero's timings on every rank)."""
    if budget.latency is None:
        raise ValueError(f"`budget`={budget!r} has no `latency`; compress() takes size / MACs budgets elsewhere")
    shape = latency_shape(budget, batches)
    check_latency_model(model, shape)
    caps: tuple[int | None, int | None] = (None, None)
    if budget.size is not None or budget.macs is not None:  # refused here when below the model's floor
        found = budget_caps(model, budget, batches[0], forward, units_shape=shape if search != "bits" else (),
                            prunable=() if search == "bits" else None)  # int8 alone removes no unit, lowers no MAC
        caps = (found.size_cap, found.macs_cap)
    threads = budget.latency_threads
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    steps: list[str] = []
    int8 = search != "sparsity" and bool(calibration_inputs(batches[:1]))
    if search != "sparsity" and not int8:
        steps.append("no int8: the calibration batches hold no float input tensor to calibrate activations with")
    evaluations = int(metric_fn is not None and before is None)
    before = measure(metric_fn, model) if evaluations else before
    problem = problem_of(model, example, shape, threads, batches, forward, loss_fn, int8=int8,
                         costs=caps != (None, None), units=search != "bits", timings=timings)
    faster = [n for n in problem.table.int8 if problem.table.time(n, *problem.table.full[n], True) <
              problem.table.time(n, *problem.table.full[n])]
    steps.append(f"{len(problem.candidates)} families of units, {problem.table.graphs} one-layer graphs timed"
                 f"{f', int8 faster than float (dense) for {faster} of {sorted(problem.table.int8)}' if int8 else ''}"
                 f"; dense {problem.table.dense * 1e3:.3g} ms per run at {shape}, {threads} thread(s)")
    narrow: Narrow | None = None
    if int8 and caps[0] is not None:  # the bytes the latency plan leaves over go to narrower widths
        def narrow(copy: nn.Module, layers: frozenset[str], size: float) -> Widths | None:
            return plan_widths(copy, layers, size, batches, forward, loss_fn)
    passing: Delivered | None = None
    for factor in (1.0, *LOOSER):
        latency = budget.latency * factor
        if latency >= 1.0:
            break
        looser = tuple(None if c is None else int(c * factor) for c in caps)
        other: list[Delivered] = []
        delivered, smallest = within(model, problem, latency, example, shape, threads, steps, batches, forward,
                                     caps=(looser[0], looser[1]), int8=int8, timings=timings, narrow=narrow,
                                     also=other)
        if delivered is None:
            if factor == 1.0:
                raise LatencyBudgetError(
                    f"`budget`={budget_text(budget, caps)}: no plan meets it as measured (ONNX Runtime at {shape} "
                    f"with {threads} thread(s)); the smallest latency fraction delivered was {smallest:.3f} of the "
                    f"dense latency; allowed: at least that, and caps above what the steps measured (steps: "
                    f"{steps})", smallest)
            continue
        if metric_fn is not None:
            accepted = None
            for candidate in (delivered, *other):
                with as_served(candidate.model):  # the bound is judged on what is timed: uint8 inputs where int8
                    candidate.metric = measure(metric_fn, candidate.model)
                evaluations += 1
                verdict = gate.judge(before, candidate.metric)
                steps.append(f"metric {candidate.metric:.6g} (drop {verdict.drop})" +
                             (f" of the plan {'with' if candidate.widths else 'without'} widths" if other else ""))
                if verdict.accepted:
                    accepted = candidate
                    break
            if accepted is None:
                continue
            delivered = accepted
        elif other and loss_fn is None:
            delivered = latency_delivery.closest_to_float(model, [delivered, *other], batches, forward, steps)
        if factor == 1.0:
            return delivered, problem, {"before": before, "evaluations": evaluations, "steps": steps, "caps": caps}
        passing = delivered
        break
    nearest = "no looser budget up to 1 met it either" if passing is None else \
        f"the smallest budget that met it as measured: latency={passing.ratio:.3f}" + \
        (f", size={passing.file_bytes}" if caps[0] is not None else "") + \
        (f", macs={passing.macs}" if caps[1] is not None else "")
    raise LatencyBudgetError(f"`budget`={budget_text(budget, caps)} and `max_metric_drop`={gate.max_drop} cannot "
                             f"both hold (measured after {evaluations} evaluations); {nearest}; allowed: a larger "
                             f"budget or a looser bound (steps: {steps})", None if passing is None else passing.ratio)


def latency_result(model: nn.Module, budget: Budget, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any],
                   loss_fn: Callable[[Any, Any], Tensor] | None, metric_fn: Callable[[nn.Module], float] | None,
                   measure: Callable[..., float], gate: MetricGate, search: str = "joint",
                   before: float | None = None, timings: Timings | None = None) -> Any:
    """:func:`compress_to_latency` as a :class:`~lightning_compress.adaptive.compress.CompressionResult`; its
    ``model`` is the compacted copy, carrying the codes of its int8 layers and their uint8 input ranges (``model``
    itself is not changed). ``export_onnx(result.model, path, example)`` then writes the static graph that was
    timed and judged (its default for a model carrying input ranges; ``calibration_data`` is asked for only where
    an int8 layer's output feeds a float layer)."""
    from lightning_compress.adaptive.compress import CompressionResult  # compress imports this module

    delivered, problem, report = compress_to_latency(model, budget, batches, forward, loss_fn, metric_fn, measure,
                                                     gate, search, before, timings)
    shape = latency_shape(budget, batches)
    macs = delivered.macs if delivered.macs is not None else macs_per_example(delivered.model, torch.zeros(shape))
    size_cap, macs_cap = report["caps"]
    rows = plan_rows(problem, delivered.plan, delivered.int8, delivered.widths)
    stored_bits(delivered.model, rows)
    return CompressionResult(delivered.model, rows, size_cap,
                             delivered.file_bytes, macs_cap, macs, report["before"], delivered.metric,
                             report["evaluations"], report["steps"], budget_latency=budget.latency,
                             latency=delivered.ratio)
