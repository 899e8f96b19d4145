"""``AdaptiveCompression``'s end of a fit under a latency budget: the compacted model timed against the dense one
and exported float (a latency budget alone, :func:`~lightning_compress.adaptive.in_fit_units.finish_latency`), or,
with size / MACs caps in the same budget, the rest met by the verified ``compress()`` path on the compacted model
(:mod:`lightning_compress.adaptive.latency_caps` says how), then timed against the dense model, measured and
exported. This touches the Trainer (ranks, validation, batches); the math is in :mod:`lightning_compress.adaptive`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_compress.adaptive.compress import CompressionResult
from lightning_compress.adaptive.costs import model_macs
from lightning_compress.adaptive.in_fit_units import LatencyRun, finish_latency, verify
from lightning_compress.adaptive.latency_budget import LatencyBudgetError, latency_result
from lightning_compress.adaptive.latency_caps import next_budget, served_graph, shared_timings, take
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.callbacks import adaptive_export, adaptive_plan
from lightning_compress.callbacks.quantization import _calibration_forward
from lightning_compress.core.gate import MetricGate
from lightning_compress.integration import evaluation
from lightning_compress.integration.evaluation import eval_mode
from lightning_compress.integration.ranks import on_every_rank
from lightning_compress.quantization.checks import measure
from lightning_compress.reporting.records import CompressionEvent
from lightning_compress.structure.compaction import save_compacted

if TYPE_CHECKING:
    from lightning_compress.callbacks.adaptive import AdaptiveCompression


def finish(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """After the fit compacted ``pl_module``: a latency budget alone is timed and the compacted float model
    exported; with size / MACs caps, :func:`_with_caps`. Any refusal or other error ends the fit on every rank (FAILED
    report; with caps the compacted floats restored first, no codes carried)."""
    if callback.budget.size is None and callback.budget.macs is None:
        try:
            finish_latency(callback, trainer, pl_module)
        except Exception as err:  # a refusal or any other failure: a FAILED report, re-raised
            callback._fail(trainer, pl_module, err)
        _export_compacted(callback, trainer, pl_module)
        _write_compacted(callback, trainer, pl_module)
        return
    floats = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}  # the way back (compacted, float)
    callback._rewrites += 1  # the weights change from here on: the last validation measured others
    adaptive_export.keep_floats(callback, trainer, pl_module, floats)  # restore_float's; the float copy staged
    try:
        result = _with_caps(callback, trainer, pl_module)
    except Exception as err:  # any failure (not only a refusal): floats back, no codes carried, a FAILED report
        adaptive_plan.back_to_floats(pl_module, floats)
        callback._fail(trainer, pl_module, _combined(callback, err) if isinstance(err, BudgetError) else err)
    callback.result = result
    adaptive_export.export(callback, trainer, pl_module, result, floats)  # measured on disk first, or refused
    callback.report.gate[callback.report_name]["delivered"]["file_bytes"] = result.file_bytes
    _write_compacted(callback, trainer, pl_module)  # the delivered model, within every cap (its float layout)


def _combined(callback: AdaptiveCompression, error: BudgetError) -> BudgetError:
    """``error`` (about the budget of the step after the units) naming the budget the user gave and what the fit
    measured before it; the nearest budget it gives is kept."""
    run = callback.run
    steps = run.planner.steps if isinstance(run, LatencyRun) and run.planner is not None else []
    said = f"`budget`={callback.budget!r} with `max_metric_drop`={callback.max_metric_drop!r} cannot hold after " \
        f"the units this fit removed for the latency (steps: {steps}): {error}"
    if isinstance(error, LatencyBudgetError):
        return LatencyBudgetError(said, error.smallest_latency)
    return BudgetError(said, error.smallest)


def _with_caps(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule
               ) -> CompressionResult:
    """The compacted model timed against the dense one (not refused yet: int8 may close the gap), then the widths
    (latency met) or int8 (latency left) planned by ``compress()`` under the caps, then the delivered model timed
    against the dense one for real, as ``export_onnx`` writes it (widths whose graph is over the latency: the int8
    path instead); the report's entry says what each step measured."""
    run, caps, budget = callback.run, callback.caps, callback.budget
    assert isinstance(run, LatencyRun) and run.planner is not None and caps is not None and budget.latency is not None
    planner = run.planner
    entry = callback.report.gate.setdefault(callback.report_name, {})
    entry.update(recovery_gate=list(run.recovery.log), capped_families=dict(run.recovery.caps))
    units = verify(planner, pl_module, run.broadcast, refuse=False, what="compacted (whole units removed)")
    batches = adaptive_plan.calibration_batches(trainer, pl_module, callback.calibration_batches, None)
    macs = model_macs(pl_module, batches[0], _calibration_forward) if caps.macs_cap is not None else None
    step, how = next_budget(budget, caps, units, macs)
    planner.steps.append(f"then {how}: compress() on the compacted model with {step!r}")
    rank_zero_info(f"AdaptiveCompression: the compacted model measured {units:.3f}x of dense; {how} for {step!r}")
    def served(model: Any) -> bytes:  # the graph export_onnx(model) writes, timed for real (rank zero)
        return served_graph(model, planner.shape, batches)

    if how == "widths":
        result = callback._compress(trainer, pl_module, budget=step)  # the caps alone: the latency is met
        try:
            result.latency = verify(planner, pl_module, run.broadcast, what="delivered", serve=served)
            callback._report_plan(trainer, pl_module, result)
        except LatencyBudgetError:  # the widths' weight-only graph is over the latency: floats back, int8 path
            adaptive_plan.back_to_floats(pl_module, callback.float_copy.state)
            step, how = next_budget(budget, caps, units, macs, widths=False)
            planner.steps.append(f"then {how}: the widths' graph is over the latency; compress() with {step!r}")
    if how == "int8":
        result = _int8(callback, trainer, pl_module, step, batches)
        result.latency = verify(planner, pl_module, run.broadcast, what="delivered", serve=served)
    result.budget_latency = budget.latency
    adaptive_plan.take_rank_zeros(trainer, pl_module, result)
    entry.update(budget={"latency": budget.latency, "latency_input": list(planner.shape), "threads": planner.threads,
                         "size": budget.size, "macs": budget.macs, "bytes": caps.size_cap,
                         "macs_per_example": caps.macs_cap},
                 delivered={"latency": result.latency, "compacted_latency": units, "file_bytes": result.file_bytes,
                            "macs_per_example": result.macs, "metric": result.metric_after,
                            "kept_units": dict(run.kept_plan)},
                 verification_steps=[*planner.steps, *result.steps], replans=run.replans, then=how)
    return result


def _int8(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule, step: Any,
          batches: list[Any]) -> CompressionResult:
    """``compress()``'s latency path, int8 only, on the compacted model (rank zero's timings on every rank), judged
    with the bound left after pruning against the metric before the first event; the delivered copy taken into
    ``pl_module``; the report's event."""
    metric_fn, before, allowed = None, None, None
    with eval_mode(pl_module):
        if callback._has_val:
            def metric_fn(model: Any) -> float:
                return evaluation.evaluate(trainer, model, callback.metric_spec)

            if callback.max_metric_drop is not None:
                before = metric_fn(pl_module)
                allowed = adaptive_plan.bound_left(callback, before)
        result = latency_result(pl_module, step, batches, _calibration_forward, None, metric_fn, measure,
                                MetricGate(allowed, callback.metric_spec.higher_is_better), "bits", before,
                                timings=shared_timings(callback.run.broadcast))  # type: ignore[attr-defined]
    take(pl_module, result.model)
    result.model = pl_module
    result.method = "int8 where the latency table measured it faster, the bytes left to narrower widths (round to " \
        "nearest)"
    initial = callback.controller.initial_metric
    callback.report.metric_before = initial if initial is not None else result.metric_before
    callback.report.gate[callback.report_name].update(plan=result.plan, evaluations=result.evaluations,
                                                      quantization=result.method)
    note = f"latency with caps: int8 for the latency left; {result.evaluations} evaluations: " + \
        "; ".join(result.steps)
    callback.report.events.append(CompressionEvent("quantize", trainer.global_step, result.metric_before,
                                                   result.metric_after, note=note, reference=result.metric_before,
                                                   drop=callback.gate.drop(result.metric_before, result.metric_after)))
    return result


def _export_compacted(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Rank zero writes the compacted float model (a latency budget alone); a failed write ends the fit on every
    rank with a FAILED report."""
    path = callback._export_file
    if path is None:
        return
    try:
        on_every_rank(trainer, lambda: save_compacted(pl_module, path) if trainer.is_global_zero else None,
                      f"the write of `export_path`={callback.export_path!r}")
    except Exception as err:
        callback._fail(trainer, pl_module, err)
    callback.report.files["compacted_export"] = str(path.resolve())



def _write_compacted(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The run's compacted model (``model.compact.safetensors``), written only now that it passed every check (the
    latency, the bound, the caps): a refused model never lands in the run's directory. A failed write ends the fit
    on every rank with a FAILED report."""
    try:
        on_every_rank(trainer, lambda: callback._save_compacted(trainer, pl_module), "the write of the compacted model")
    except Exception as err:
        callback._fail(trainer, pl_module, err)
