"""``compress(model, budget=Budget(size="25MB"), calibration_data=...)``: per-layer bits, granularity and sparsity
chosen together to fit a budget, for a trained ``nn.Module`` without a Trainer. No Lightning import.

1. Checks (arguments, then the budget against its floor: every weight pruned, only the scales stored, or every
   layer at its largest sparsity), all before any weight changes or any backward pass runs.
2. Diagonal Fisher from a few backward passes (:mod:`.fisher`), every layer's candidates with exact bytes, MACs
   and predicted loss increase (:mod:`.candidates`). A pruned quantized weight is exported in a sparse layout
   where that is smaller (:mod:`~lightning_compress.quantization.sparse_layout`), and its candidate is priced with
   exactly those bytes. Sparsity is offered under a MACs cap, under a size budget alone with ``search="all"``, and
   by ``"joint"`` where no dense plan fits the size, or where the dense plan puts a layer at 2 bits and there is
   something to measure plans on (that dense plan is then measured beside the sparse one). Not otherwise, because
   on a digits MLP the diagonal Fisher under-predicted what 75 % pruning costs and the sparse plan it chose at one
   size measured worse than the dense one (README, "Compress to a budget"). Where the sparse plans' larger header
   leaves none within the size cap, the dense problem is verified alone (``"all"`` / ``"sparsity"`` under a size
   cap alone too: their unpruned candidates).
3. A multiple-choice knapsack picks one candidate per layer (:mod:`.knapsack`, :mod:`.plan`). ``"joint"`` then
   measures the plan beside the few uniform configurations that fit and delivers one measured better beyond the
   noise instead (:mod:`.rivals`: the second-order score under-predicts large changes to large layers).
4. The plan is written into the model (it carries its codes: ``result.save(path)`` / ``export_onnx`` take it; a
   plan that keeps every layer float carries none and is written float), the file and the MACs are measured, and
   ``metric_fn`` decides (:mod:`.session`). A model over budget or outside the bound is never returned:
   :class:`~.session.BudgetError` gives the smallest budget that met the bound as measured, and the model gets its
   float weights back (also if anything else raises).
5. ``method="gptq"``: the verified plan's widths applied with GPTQ on the calibration batches, kept only where
   measured no worse than round to nearest and within the caps (:mod:`.gptq_plan`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.candidates import SPARSITIES, WIDTHS, layer_candidates
from lightning_compress.adaptive.caps import budget_caps
from lightning_compress.adaptive.costs import aliases, write_file
from lightning_compress.adaptive.delivery import write_within
from lightning_compress.adaptive.fisher import diagonal_fisher
from lightning_compress.adaptive.gptq_plan import METHODS, apply_gptq
from lightning_compress.adaptive.latency_budget import latency_result, refuse_ignored
from lightning_compress.adaptive.plan import FLOOR_BITS, Problem, rows
from lightning_compress.adaptive.rivals import UNIFORM_TRIED, against_float
from lightning_compress.adaptive.scales import measured_scales
from lightning_compress.adaptive.session import BUDGET_STEPS, BudgetError, Session
from lightning_compress.core.gate import MetricGate
from lightning_compress.core.validation import check_bool, check_choice, check_number
from lightning_compress.quantization.calibration import feed, take_batches, to_device
from lightning_compress.quantization.carried import attach, carried, forget
from lightning_compress.quantization.checks import check_finite_batches, check_metric_fn, check_runs, measure
from lightning_compress.quantization.coverage import (
    QUANT_MODULE_TYPES,
    check_finite,
    layer_weight,
    select_layers,
    weight_key,
)
from lightning_compress.quantization.export import new_run_id
from lightning_compress.quantization.primitives import CALIBRATIONS

FISHER_BATCHES = 8  # backward passes for the Fisher (and batches kept for the forward that counts positions)
SCALES = ("measured", "fisher")
SEARCHES = ("joint", "bits", "sparsity", "all")  # what the plan may choose per layer (the baselines of bench_adaptive)
SPARSITY_ONLY_BITS = 8  # search="sparsity": every layer at this width (float pruned weights save no bytes)
CORRECTIONS = 2  # re-solves after a failed bound before larger budgets are tried
RUN_ID_CHARS = len(new_run_id())  # the generated run_id file_bytes is measured with


@dataclass
class CompressionResult:
    """What :func:`compress` delivered: the model (carrying its codes), the plan per layer, the budget and what
    the delivered file / MACs came to, the metric before and after, and the verification steps taken."""

    model: nn.Module
    plan: list[dict[str, Any]]
    budget_bytes: int | None
    file_bytes: int | None  # measured under a size cap: the bytes save(path) writes
    budget_macs: int | None
    macs: int | None  # counted on the delivered weights, per example
    metric_before: float | None = None
    metric_after: float | None = None
    evaluations: int = 0  # metric_fn calls
    steps: list[str] = field(default_factory=list)
    budget_latency: float | None = None  # a latency budget: the fraction of the dense model's ORT latency allowed
    latency: float | None = None  # measured: the delivered model's ORT latency / the dense model's
    method: str = "rtn"  # how the delivered codes were made: "rtn", or "gptq" where that measured no worse
    tried: list[dict[str, Any]] = field(default_factory=list)  # each plan the verification measured (Session.tried)

    def save(self, path: str | os.PathLike[str], *, run_id: str | None = None) -> Path:
        """Write the delivered model to ``path`` as the file ``file_bytes`` measured (:func:`.costs.write_file`):
        its codes (``save_quantized``), or its float weights (``save_float``) where the plan kept every layer float;
        ``load_compressed(model, path)`` reads either back. Under a size cap the file is staged and measured first
        (:func:`.delivery.write_within`): ``run_id`` goes into its header, measured with a generated
        :data:`RUN_ID_CHARS`-character one, so a longer one can push it over; then nothing is written or replaced
        and :class:`BudgetError` names ``run_id`` and the bytes."""
        if self.budget_bytes is None:
            return write_file(self.model, path, run_id=run_id)
        outcome, error = write_within(self.model, Path(path), self.budget_bytes, f"{self.budget_bytes} bytes",
                                      run_id=run_id)
        if outcome.kind == "budget" and outcome.file_bytes is not None:
            over = outcome.file_bytes - self.budget_bytes
            raise BudgetError(f"`run_id`={run_id!r} ({len(run_id or '')} characters) goes into the file's header: "
                              f"the file measured {outcome.file_bytes} bytes with it, {over} over the size cap of "
                              f"{self.budget_bytes} bytes the plan was verified under, so nothing was written at "
                              f"{os.fspath(path)!r}; allowed: a run_id about {over} characters shorter, or None "
                              f"(a generated {RUN_ID_CHARS}-character one, as measured)", outcome.smallest)
        if error is not None:
            raise error
        return Path(path)


def _check(budget: Any, forward: Any, loss_fn: Any, metric_fn: Any, max_metric_drop: Any, higher_is_better: Any,
           calibration: Any, calibration_batches: Any, corrections: Any) -> None:
    if not isinstance(budget, Budget):
        raise TypeError(f"`budget` must be a lightning_compress.Budget, e.g. Budget(size='25MB'), got {budget!r}")
    for name, value in (("forward", forward), ("loss_fn", loss_fn)):
        if value is not None and not callable(value):
            raise TypeError(f"`{name}` must be None or a callable, got {value!r}")
    check_metric_fn(metric_fn)
    check_bool("higher_is_better", higher_is_better)
    check_choice("calibration", calibration, CALIBRATIONS)
    check_number("calibration_batches", calibration_batches, low=1, integer=True)
    check_number("corrections", corrections, low=0, high=10, integer=True)
    if max_metric_drop is not None:
        check_number("max_metric_drop", max_metric_drop, low=0.0)
        if metric_fn is None:
            raise ValueError(f"`max_metric_drop`={max_metric_drop} needs `metric_fn` (a callable model -> float)")


def compress(
    model: nn.Module,
    budget: Budget,
    calibration_data: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    metric_fn: Callable[[nn.Module], float] | None = None,
    max_metric_drop: float | None = None,
    higher_is_better: bool = True,
    calibration: str = "mse",
    calibration_batches: int = FISHER_BATCHES,
    corrections: int = CORRECTIONS,
    scale: str = "fisher",
    search: str = "joint",
    method: str = "rtn",
    before: float | None = None,
    sync: Callable[[Any], Any] | None = None,
    one_rank: Callable[[Callable[[], Any]], Any] | None = None,
) -> CompressionResult:
    """Compress ``model`` in place to fit ``budget`` with the smallest predicted loss increase.

    Args:
        budget: :class:`~.budget.Budget` (size and / or MACs; or latency: whole units are removed and the result's
            ``model`` is a compacted copy, ``model`` itself is left as it is, :mod:`.latency_budget`).
        calibration_data: batches for the Fisher (at most ``calibration_batches``); fed as ``forward(model,
            batch)``, default: dicts as ``model(**batch)``, tuples as ``model(batch[0])``.
        loss_fn: ``loss_fn(output, batch) -> scalar``; default: the model's own softmax (see :mod:`.fisher`).
        metric_fn, max_metric_drop, higher_is_better: the bound the delivered model must meet (measured).
        calibration: how each candidate's clipping range is chosen (``"mse"``: what makes 2-4 bits usable).
        corrections: re-solves with measured corrections after a failed bound.
        scale: ``"fisher"``: the Fisher's scores as they are; ``"measured"``: each layer's scores scaled by one
            measured loss change (:mod:`.scales`; ``benchmarks/bench_adaptive.py`` compares the two).
        search: ``"joint"``: widths, granularity and, under a MACs cap, where no dense plan fits or where the dense
            plan needs 2 bits somewhere, sparsity together; the plan is then measured beside
            :data:`~.rivals.UNIFORM_TRIED` uniform configurations that fit (on ``metric_fn``; without it and without
            ``loss_fn``, on the top-1 loss against the float model's predictions on the calibration batches for a
            classifier's ``(N, C)`` output, else on the output error relative to the float outputs), and one better
            beyond the noise (:func:`~.rivals.clearly_lower`) is delivered instead; ``"all"``: sparsity
            under a size budget alone too (priced in the sparse layout's bytes); ``"bits"``: widths and granularity
            only, sparsity 0 (what ModelOpt's ``auto_quantize`` searches); ``"sparsity"``: sparsity and granularity
            only, every layer at :data:`SPARSITY_ONLY_BITS` (the baselines the joint search is measured against).
        method: ``"rtn"``: the plan as scored (round to nearest with ``calibration``'s clipping); ``"gptq"``: the
            verified plan's widths then applied with GPTQ on ``calibration_data``, kept where measured no worse
            (``metric_fn``, else the KL to the float outputs) and within the caps (:mod:`.gptq_plan`).
        before: ``metric_fn(model)`` the caller already measured on these very weights (not measured again).
        sync: applied to the Fisher before any decision is taken on it (DDP: rank zero's on every rank, so that
            every rank plans alike and makes the same evaluations, which are collectives).
        one_rank: ``one_rank(work)`` runs ``work`` where one rank's result serves all (DDP: the Fisher and GPTQ on
            rank zero alone, their results broadcast); None: here.

    Raises:
        ValueError: a budget below its floor (before any work); :class:`~.session.BudgetError` when the budget and
            the bound cannot both hold (the model is restored to float).
    """
    _check(budget, forward, loss_fn, metric_fn, max_metric_drop, higher_is_better, calibration,
           calibration_batches, corrections)
    check_choice("scale", scale, SCALES)
    check_choice("search", search, SEARCHES)
    check_choice("method", method, METHODS)
    if budget.latency is not None:  # what the latency path would ignore is refused
        refuse_ignored(budget, {"method": (method, "rtn"), "calibration": (calibration, "mse"), "scale": (scale,
                       "fisher"), "corrections": (corrections, CORRECTIONS), "before": (before, None), "sync": (sync,
                       None), "one_rank": (one_rank, None)})
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    layers, _ = select_layers(model, QUANT_MODULE_TYPES)
    check_finite(layers)
    keys = {name: weight_key(name, module) for name, module in layers.items()}
    weights = {name: layer_weight(name, module) for name, module in layers.items()}
    run = forward or feed
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = [to_device(b, device) for b in take_batches(calibration_data, calibration_batches)]
    check_finite_batches(batches)
    check_runs(model, batches[0], run)
    if budget.latency is not None:  # whole units removed, timed in ONNX Runtime; model itself left unchanged
        return latency_result(model, budget, batches, run, loss_fn, metric_fn, measure,
                              MetricGate(max_metric_drop, higher_is_better), search)
    caps = budget_caps(model, budget, batches[0], run)  # refuses a budget below the floor, before any work
    where, fixed, other, size_cap, macs_cap = caps.where, caps.fixed_bytes, caps.other_macs, caps.size_cap, \
        caps.macs_cap
    earlier = carried(model)
    earlier_codes = dict(earlier.codes) if earlier is not None else {}
    floats = {name: w.detach().clone() for name, w in weights.items()}
    gate = MetricGate(max_metric_drop, higher_is_better)
    try:
        before = measure(metric_fn, model) if metric_fn is not None and before is None else before
        fisher = diagonal_fisher(model, weights, batches, run, loss_fn) if one_rank is None else \
            one_rank(lambda: diagonal_fisher(model, weights, batches, run, loss_fn))
        fisher = sync(fisher) if sync is not None else fisher
        proxy = against_float(model, batches, run) if search == "joint" and (metric_fn is not None or loss_fn is None) \
            else None  # with a metric: the per-sample noise of the rivals' comparison (.rivals.clearly_lower)
        sparsities = SPARSITIES if budget.macs is not None or search in ("sparsity", "all") else (0.0,)
        sparsities = (0.0,) if search == "bits" else sparsities
        widths = (SPARSITY_ONLY_BITS,) if search == "sparsity" else WIDTHS
        session = Session(model, layers, weights, keys, floats, fisher, where, calibration, metric_fn, measure, gate,
                          before, evaluations=int(metric_fn is not None),
                          rivals=UNIFORM_TRIED if search == "joint" else 0, proxy=proxy)

        def problem_with(sparsities: tuple[float, ...]) -> tuple[Problem, int]:
            candidates = {n: layer_candidates(n, layers[n], weights[n], fisher[n], where[n], count, calibration,
                                              widths=widths, sparsities=sparsities)
                          for n, count in aliases(model, keys).items()}
            problem = Problem(candidates, fixed, other, size_cap, macs_cap)
            if scale == "measured":
                problem.multipliers = measured_scales(model, weights, fisher, candidates, batches, run, loss_fn,
                                                      calibration)
            return problem, session.header(problem) if size_cap is not None else 0

        problem, header = problem_with(sparsities)
        fallback: tuple[Problem, int] | None = None  # the dense problem whose plan fit, where sparsity was offered
        if search == "joint" and sparsities == (0.0,):
            dense = problem.choose(header)
            if dense is None:
                session.steps.append(f"no dense plan fits {size_cap} B (the smallest dense file: "
                                     f"{session.cheapest_file} B): sparsity offered (priced in the sparse layout's "
                                     "bytes)")
                problem, header = problem_with(SPARSITIES)
            elif any(c.bits == FLOOR_BITS for c in dense.values()) and (proxy is not None or metric_fn is not None):
                session.steps.append(f"the dense plan puts a layer at {FLOOR_BITS} bits: sparsity offered too, and "
                                     "the dense plan measured beside that plan")
                session.also = [dense]
                fallback = (problem, header)
                problem, header = problem_with(SPARSITIES)
        delivered = session.verified(problem, header, corrections)
        unpruned = problem.dense() if search != "joint" and size_cap is not None and macs_cap is None else None
        if delivered is None and unpruned is not None:  # "all" / "sparsity": the dense plans, as "joint" has them
            fallback = (unpruned, session.header(unpruned))  # measured: the refusal may name its smaller file
        if delivered is None and fallback is not None:  # the sparse plans' larger header can leave none within
            session.steps.append("no plan with sparsity offered was delivered: the dense problem verified alone "
                                 "(its cheapest plan's header is smaller)")
            session.also = []
            delivered = session.verified(*fallback, corrections)
            if delivered is not None or search == "joint":  # else larger budgets are searched with sparsity
                problem, header = fallback
        if delivered is None:
            _refuse(session, problem, header, budget)
        used = "rtn"
        if method == "gptq":
            delivered, used = apply_gptq(session, problem, delivered, batches, run, one_rank=one_rank)
    except BaseException:
        with torch.no_grad():
            for name, weight in weights.items():
                weight.copy_(floats[name])
        forget(model)
        if earlier is not None:
            attach(model, earlier_codes, earlier.source)
        raise
    return CompressionResult(model, rows(delivered.plan, problem, session.measured), size_cap, delivered.file_bytes,
                             macs_cap, delivered.macs, before, delivered.metric, session.evaluations, session.steps,
                             method=used, tried=session.tried)


def _refuse(session: Session, problem: Problem, header: int, budget: Budget) -> NoReturn:
    """Raise :class:`BudgetError` with the smallest file this model can be written as, or the smallest larger budget
    found that met the bound (without one: that a plan fits), as measured."""
    asked = f"`budget`={budget!r} ({problem.size_cap} bytes / {problem.macs_cap} MACs per example)"
    cheapest = session.cheapest_file
    if problem.size_cap is not None and cheapest is not None and problem.size_cap < cheapest:
        raise BudgetError(f"{asked}: no plan fits; the smallest file this model can be written as is {cheapest} "
                          "bytes (the cheapest candidate of every layer, header included); allowed: at least that",
                          (cheapest, None))
    found = session.smallest_passing(problem, header)
    bound = session.gate.max_drop is not None  # without one, only the caps can fail: no talk of a bound
    what, held, looser = (f"and `max_metric_drop`={session.gate.max_drop} cannot both hold", "that met the bound",
                          " or a looser bound") if bound else ("leaves no plan that fits (header included)",
                                                               "a plan fits", "")
    if found is None:
        raise BudgetError(f"{asked} {what}, and no budget up to {BUDGET_STEPS[-1]}x larger was one {held} (steps: "
                          f"{session.steps})", None)
    smallest = (found.size_cap, found.macs_cap)
    raise BudgetError(f"{asked} {what} (measured after {session.evaluations} evaluations); the smallest budget "
                      f"{held} as measured: {smallest[0]} bytes / {smallest[1]} MACs per example; allowed: a budget "
                      f"at least that large{looser}", smallest)
