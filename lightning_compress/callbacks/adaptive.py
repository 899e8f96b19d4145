"""``AdaptiveCompression``: a budget in, a verified model out, inside the fit. The math lives in
:mod:`lightning_compress.adaptive` (:mod:`~lightning_compress.adaptive.in_fit` for the fit's half); this coordinates.

- ``setup``: every argument and the budget against this model's floor, before any training step.
- During the fit it is :class:`~lightning_compress.callbacks.pruning.GradientStabilityPruning` (the same statistics,
  events, gate, rollback and report) with per-layer targets: at each event the sparsity of every layer is planned
  again from the gradient statistics (:class:`~lightning_compress.adaptive.in_fit.BudgetRun`).
- At the end: the masks reached are frozen, and :func:`~lightning_compress.adaptive.compress.compress` plans widths
  and granularity with each layer's sparsity fixed (``search="bits"``), quantizes (round to nearest with the
  calibration's clipping search), verifies the bound with the real metric on the validation data, then, with
  ``method="gptq"`` (the default), applies the chosen widths with GPTQ on the training batches and keeps it only
  where measured no worse (:mod:`~lightning_compress.adaptive.gptq_plan`); the export (the codes the model carries)
  is measured before it is written (:mod:`~lightning_compress.adaptive.delivery`), on rank zero, and every rank
  takes its outcome.
  A budget and a bound that cannot both hold, or an export measured over the budget, end the fit on every rank with
  :class:`~lightning_compress.adaptive.session.BudgetError` (the smallest budget known to hold, as measured) and a
  FAILED report; no file is left at the export path and the model keeps its float (pruned) weights.
- With a ``QuantizationAwareTraining`` (pruning first, QAT last): widths planned when QAT starts, trained by it, then
  checked and delivered as trained (:mod:`~lightning_compress.callbacks.adaptive_qat`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_compress.adaptive import in_fit_units
from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.caps import Caps, budget_caps
from lightning_compress.adaptive.compress import CORRECTIONS, FISHER_BATCHES, CompressionResult
from lightning_compress.adaptive.gptq_plan import METHODS
from lightning_compress.adaptive.in_fit import BudgetRun, SparsityPlanner, shortfall
from lightning_compress.adaptive.in_fit_units import LatencyPlanner, LatencyRun, latency_setup
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.adaptive.with_qat import BudgetPlan
from lightning_compress.callbacks import adaptive_export, adaptive_latency, adaptive_plan, adaptive_qat
from lightning_compress.callbacks.adaptive_export import FloatCopy, float_copy_file
from lightning_compress.callbacks.pruning import GradientStabilityPruning
from lightning_compress.callbacks.qat import QuantizationAwareTraining
from lightning_compress.callbacks.quantization import _calibration_forward
from lightning_compress.core.accounting import FLOAT_BITS, bias_bytes, layer_float_bytes
from lightning_compress.core.io import check_export_path
from lightning_compress.core.validation import check_bool, check_choice, check_number
from lightning_compress.integration import _compat
from lightning_compress.integration.evaluation import DEFAULT_METRIC
from lightning_compress.integration.ranks import on_every_rank
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.schedule import PruningSchedule
from lightning_compress.pruning.tracked import TrackedLayers
from lightning_compress.quantization.coverage import layer_weight
from lightning_compress.reporting.records import CompressionEvent

PROGRESS = 1.0  # the schedule ramps progress from 0 to 1; each layer's target is its planned sparsity times it
QUANTIZED_BY = {"gptq": "GPTQ at the widths planned", "rtn": "round to nearest with the calibration's clipping search",
                "qat": "the widths planned when QAT started, trained by QuantizationAwareTraining, as trained"}
PLANNED_MAX = 0.9  # the largest sparsity a plan can give (adaptive.candidates.SPARSITIES), for PruningConfig


def as_budget(budget: Any) -> Budget:
    """``budget`` as a :class:`Budget`: one already, or a dict of its fields (what a YAML config gives)."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, dict) and set(budget) <= {"size", "macs", "latency", "latency_input", "threads"}:
        return Budget(**budget)
    raise TypeError(f"`budget` must be a lightning_compress.Budget or a dict with keys among 'size', 'macs', "
                    f"'latency', 'latency_input', 'threads', e.g. {{'size': '25MB'}}, got {budget!r}")


class AdaptiveCompression(GradientStabilityPruning):
    """Compress to ``budget`` within ``max_metric_drop`` during the fit: per-layer sparsity while training, per-layer
    widths at its end (see the module docstring).

    Args:
        budget: :class:`~lightning_compress.Budget` (``size``: bytes of the exported file, ``"25MB"`` or a fraction
            of the fp32 model; ``macs``: a count or a fraction) or a dict of those fields. ``latency`` (a fraction
            of the dense model's ONNX Runtime time): whole units are pruned during the fit, the model is compacted
            at its end and timed (:mod:`lightning_compress.adaptive.in_fit_units`); alone, it stays float; with
            ``size`` / ``macs``, widths or int8 are planned on the compacted model for what is left
            (:mod:`lightning_compress.adaptive.latency_caps`).
        max_metric_drop: the bound on the delivered model's metric against the one before the first pruning event
            (the float model at the end of the fit when nothing was pruned); None: no bound.
        export_path: ``*.safetensors`` for the delivered model (relative: in the run's log directory).
            ``save_float_copy``: the trained float weights (pruned, before the codes) also written beside it as
            ``*.fp32.safetensors`` once the export is (not with a latency budget alone: that export is float);
            :meth:`restore_float` puts them back into the model after the fit either way.
        calibration: the clipping search of each candidate's scales; ``calibration_batches``: training batches for
            the end-of-fit Fisher, MACs and GPTQ; ``corrections``: re-solves after a failed bound.
        method: ``"gptq"``: the end-of-fit plan's widths applied with GPTQ on the training batches, kept where
            measured no worse than round to nearest (the metric, else the KL to the float outputs); ``"rtn"``:
            round to nearest only (faster); with a ``QuantizationAwareTraining``, the codes it trained instead.
        schedule, schedule_unit, start_step, end_step, frequency: when the pruning events happen (as
            ``GradientStabilityPruning``); module_types / include / exclude: the layers pruned (all Linear /
            Conv / Embedding weights are quantized); metric / metric_kwargs / on_violation / patience /
            gate_batches / verbose: as there.
    """

    report_name = "adaptive"
    plans_widths = True  # what QuantizationAwareTraining looks for in its peers (it plans the widths QAT trains)
    writes_compacted = False  # a latency budget's compacted model is written once it passed every check

    def __init__(
        self,
        budget: Budget | dict[str, Any],
        max_metric_drop: float | None = None,
        export_path: str | None = None,
        calibration: Literal["mse", "minmax", "percentile"] = "mse",
        calibration_batches: int = FISHER_BATCHES,
        corrections: int = CORRECTIONS,
        method: Literal["gptq", "rtn"] = "gptq",
        schedule: Literal["polynomial", "constant", "one_shot"] = "polynomial",
        schedule_unit: Literal["step", "epoch"] = "step",
        start_step: int | None = None,
        end_step: int | None = None,
        frequency: int | None = None,
        module_types: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        metric: str = DEFAULT_METRIC,
        metric_kwargs: dict[str, Any] | None = None,
        on_violation: Literal["backoff", "stop"] = "backoff",
        patience: int | None = None,
        gate_batches: int | None = None,
        verbose: int = 1,
        save_float_copy: bool = True,
    ) -> None:
        self.budget = as_budget(budget)
        check_bool("save_float_copy", save_float_copy)
        latency = self.budget.latency is not None  # whole units pruned, compacted at the end (adaptive.in_fit_units)
        if export_path is not None and (not isinstance(export_path, str) or not export_path.endswith(".safetensors")):
            raise ValueError(f"`export_path` must be None or a path ending in '.safetensors', got {export_path!r}")
        check_number("calibration_batches", calibration_batches, low=1, integer=True)
        check_number("corrections", corrections, low=0, high=10, integer=True)
        check_choice("method", method, METHODS)
        if calibration not in ("mse", "minmax", "percentile"):
            raise ValueError(f"`calibration` must be one of ['mse', 'minmax', 'percentile'], got {calibration!r}")
        super().__init__(
            sparsity=PLANNED_MAX, criterion="taylor", structured=latency, compact=latency, scope="layer",
            schedule=schedule, schedule_unit=schedule_unit,
            start_step=start_step, end_step=end_step, frequency=frequency,
            statistics="per_unit" if latency else "per_weight",
            module_types=module_types, include=include, exclude=exclude, metric=metric, metric_kwargs=metric_kwargs,
            max_metric_drop=max_metric_drop, metric_reference="initial", on_violation=on_violation,
            patience=patience, gate_batches=gate_batches, verbose=verbose,
        )
        self.export_path, self.calibration, self.save_float_copy = export_path, calibration, save_float_copy
        self.calibration_batches, self.corrections, self.method = calibration_batches, corrections, method
        if self.budget.size is None and self.budget.macs is None:  # with caps, the widths are planned too
            adaptive_plan.refuse_ignored_by_latency(self)
        self.seen = adaptive_plan.SeenBatches(calibration_batches)  # the calibration batches of a plan made mid-fit
        self.caps: Caps | None = None
        self._latency_shape: tuple[int, ...] = ()  # a latency budget's input shape, set in setup
        self.result: CompressionResult | None = None
        self._export_file: Path | None = None
        self.float_copy = FloatCopy()  # the trained float weights (restore_float) and their file, set in setup
        self._qat: QuantizationAwareTraining | None = None  # trains the widths planned at its start

    def _reset_run(self, pl_module: pl.LightningModule | None = None, layers: TrackedLayers | None = None,
                   config: PruningConfig | None = None) -> None:
        super()._reset_run(pl_module, layers, config)
        run_type = LatencyRun if self.budget.latency is not None else BudgetRun
        self.run = run_type(self.run.config, self.gate, self.metric_reference, pl_module, layers)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(budget=repr(self.budget), selection=self.selection.describe())

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "budget": {k: getattr(self.budget, k) for k in ("size", "macs", "latency")},
                "export_path": self.export_path, "calibration": self.calibration,
                "calibration_batches": self.calibration_batches, "corrections": self.corrections,
                "method": self.method, "save_float_copy": self.save_float_copy}

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._qat = adaptive_qat.qat_peer(self, trainer)
        self.result, self.seen = None, adaptive_plan.SeenBatches(self.calibration_batches)
        if self.budget.latency is not None:  # the model runs, exports to ONNX and opens in ORT, on every rank
            budget = self.budget
            self._latency_shape = on_every_rank(trainer, lambda: latency_setup(pl_module, budget),
                                                f"`budget`={budget!r}")
        self.caps = budget_caps(pl_module, self.budget, *self._example(trainer, pl_module),
                                estimate=self.budget.latency is None,  # compaction would shrink what it prices
                                prunable=self.layers.names, units_shape=self._latency_shape)  # latency: units
        if self.caps.cheapest is not None and self.caps.size_cap is not None and \
                self.caps.size_cap < self.caps.cheapest:
            rank_zero_warn(f"AdaptiveCompression: `budget` size={self.budget.size!r} ({self.caps.size_cap} bytes) is "
                           f"below the {self.caps.cheapest} bytes of tensor data the cheapest plan (int2, 90 % "
                           "sparse everywhere) takes on the weights now; unless training makes most kept weights "
                           "round to zero the fit will end in a BudgetError naming the smallest file")
        if self.export_path is not None:  # rank zero alone creates the folder, so it alone may refuse: all refuse
            path, folder = self.export_path, self.run_dir(trainer)
            self._export_file = on_every_rank(
                trainer, lambda: check_export_path(path, folder, create=trainer.is_global_zero),
                f"`export_path`={path!r}")
        self.float_copy = FloatCopy(float_copy_file(self, trainer))

    def restore_float(self, pl_module: pl.LightningModule) -> None:
        """The trained float weights taken before the codes (pruned; compacted with a latency budget) back into
        ``pl_module``, which then carries no codes."""
        if not self.float_copy.state:
            raise ValueError("`restore_float`: this AdaptiveCompression delivered no model yet (no fit ended), so it "
                             "holds no float weights; allowed: after `trainer.fit` delivered")
        adaptive_plan.back_to_floats(pl_module, self.float_copy.state)

    def _example(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, Any]:
        """(a batch, how to feed it) for counting MACs: only a MACs budget reads it. The first training batch, else
        the model's ``example_input_array`` (what budget_caps' refusal suggests when there is neither)."""
        if self.budget.macs is None:
            return None, None
        loader = _compat.training_dataloader(trainer)
        with torch.random.fork_rng(devices=[]):  # the fit's random stream is left as it was
            batch = next(iter(loader), None) if loader is not None else None
        if batch is None:
            example = getattr(pl_module, "example_input_array", None)
            if not isinstance(example, torch.Tensor):
                return None, None
            return example.to(pl_module.device), lambda model, inputs: model(inputs)
        return trainer.strategy.batch_to_device(batch, pl_module.device), _calibration_forward

    def _schedule(self, trainer: pl.Trainer) -> PruningSchedule:
        schedule = super()._schedule(trainer)
        return PruningSchedule(schedule.kind, PROGRESS, schedule.start, schedule.end, schedule.frequency)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        assert self.caps is not None  # set in setup
        run = self.run
        assert isinstance(run, (BudgetRun, LatencyRun))
        run.planner = SparsityPlanner(pl_module, dict(self.layers.modules), self.caps) if isinstance(run, BudgetRun) \
            else LatencyPlanner(pl_module, float(self.budget.latency or 0), self._latency_shape,
                                self.budget.latency_threads)
        run.broadcast = lambda plan: trainer.strategy.broadcast(plan, src=0)
        if isinstance(run.planner, LatencyPlanner):
            run.planner.share = run.broadcast  # the latency table: rank zero's, timed once per fit

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, *_)
        self.seen.add(batch)  # as the fit feeds it: a plan made mid-fit never reads the fit's loader

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._qat is not None and self._qat.budget_plan is None:  # QAT's plan still to come: its batches
            state["qat_calibration_batches"] = self.seen.state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.seen.batches = list(state.pop("qat_calibration_batches", None) or [])[: self.seen.count]
        super().load_state_dict(state)

    def _check_target(self, delivered: float) -> None:
        run = self.run
        assert isinstance(run, (BudgetRun, LatencyRun))
        short = shortfall(run.plan_by_layer, run.reached())
        self.report.gate.setdefault(self.report_name, {}).update(
            planned_sparsity=dict(run.plan_by_layer), reached_sparsity=run.reached(), replans=run.replans,
            shortfall={n: f"planned {p:.2f}, reached {r:.2f}" for n, (p, r) in short.items()} or None)

    # ------------------------------------------------------------------ end of fit
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._compacted:  # latency: the last event, held, is judged after the rest of the fit
            in_fit_units.settle_last(self, trainer, pl_module)
        super()._finish(trainer, pl_module)  # the masks reached, frozen into the weights (latency: compacted)
        if isinstance(self.run, LatencyRun):  # timed against the dense model; with caps, widths / int8 after
            adaptive_latency.finish(self, trainer, pl_module)
            return
        self._rewrites += 1  # the weights change from here on: the last validation measured others
        # the way back should the export fail (compress() restores the floats on its own failures)
        codes = self._qat.hand_over(trainer, pl_module) if self._qat is not None else {}
        floats = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        adaptive_export.keep_floats(self, trainer, pl_module, floats)
        try:
            result, refused = adaptive_qat.deliver_trained(self, trainer, pl_module, codes, floats)
            if result is None:
                result = self._compress(trainer, pl_module)
                result.steps[:0] = [refused] if refused else []
            adaptive_plan.take_rank_zeros(trainer, pl_module, result)
            self.result = result
        except BudgetError as err:
            self._fail(trainer, pl_module, err)
        adaptive_export.export(self, trainer, pl_module, result, floats)
        self._report_plan(trainer, pl_module, result)

    def _batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """Rank zero's first ``calibration_batches`` training batches, on every rank (after the fit's loop)."""
        return adaptive_plan.calibration_batches(trainer, pl_module, self.calibration_batches, None)

    def plan_widths(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> BudgetPlan:
        """For QuantizationAwareTraining when it starts: the widths the end of the fit would plan, not delivered."""
        return adaptive_qat.plan_widths(self, trainer, pl_module)

    def _compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule, method: str | None = None,
                  mid_fit: bool = False, budget: Budget | None = None) -> CompressionResult:
        """The widths planned for ``budget`` (default :attr:`budget`; a latency budget's caps after the units)."""
        return adaptive_plan.plan(self, trainer, pl_module, method, mid_fit, budget)

    def _fail(self, trainer: pl.Trainer, pl_module: pl.LightningModule, error: Exception) -> NoReturn:
        self.float_copy.discard()  # a refused fit writes no float copy either
        super()._fail(trainer, pl_module, error)

    def _report_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: CompressionResult) -> None:
        """The plan per layer into the report's layers, the budget and what was delivered into its gate entry."""
        modules = dict(pl_module.named_modules())
        for row in result.plan:
            module = modules[row["layer"]]
            weight = layer_weight(row["layer"], module)
            record = self.report.record_layer(row["layer"], weight.numel(), layer_float_bytes(module, weight))
            record.bits = row["bits"]
            if row["bits"] != FLOAT_BITS:
                record.bytes_compressed = row["bytes"] + bias_bytes(module)
            measured = "" if row["measured_drop"] is None else f", measured drop alone {row['measured_drop']:.4g}"
            record.note = f"plan: {row['label']} at sparsity {record.sparsity:.2f}; predicted loss change " \
                f"{row['predicted']:.4g}{measured}"
        entry = self.report.gate[self.report_name]
        entry.update(budget={"size": self.budget.size, "macs": self.budget.macs, "bytes": result.budget_bytes,
                             "macs_per_example": result.budget_macs},
                     delivered={"file_bytes": result.file_bytes, "macs_per_example": result.macs},
                     plan=result.plan, verification_steps=list(result.steps), evaluations=result.evaluations,
                     tried=list(result.tried),
                     quantization=QUANTIZED_BY.get(result.method, QUANTIZED_BY["rtn"]))
        initial = self.controller.initial_metric  # the bound's reference: the headline drop includes pruning's
        self.report.metric_before = initial if initial is not None else result.metric_before
        drop = self.gate.drop(result.metric_before, result.metric_after)
        note = (f"budget {self.budget.size!r} / {self.budget.macs!r} MACs = {result.budget_bytes} B / "
                f"{result.budget_macs} MACs per example; delivered file {result.file_bytes} B, {result.macs} MACs; "
                f"{result.evaluations} evaluations: " + "; ".join(result.steps))
        self.report.events.append(CompressionEvent("quantize", trainer.global_step, result.metric_before,
                                                   result.metric_after, note=note, reference=result.metric_before,
                                                   drop=drop))
        rank_zero_info(f"AdaptiveCompression: delivered file {result.file_bytes} B (budget {result.budget_bytes}), "
                       f"{result.macs} MACs per example (budget {result.budget_macs}); steps: {result.steps}")

    def checkpoint_details(self) -> dict[str, Any]:
        bits = {row["layer"]: row["bits"] for row in self.result.plan} if self.result is not None else {}
        return {**super().checkpoint_details(), "quantized": bits,
                "export": str(self._export_file.resolve()) if self._export_file is not None else None}
