"""``GradientStabilityPruning``: prune during training from running gradient statistics.

The callback coordinates the Trainer's hooks; every decision lives in a pure module of
:mod:`lightning_compress.pruning` (statistics, criteria, planner, schedule, controller).

* ``on_after_backward``: statistics of the gradient of each *optimizer step*: under gradient accumulation only the
  last micro-batch of each window is read (``.grad`` then holds the step's gradient); under 16-bit AMP the loss
  scale is divided out and a step with NaN/inf gradients is not counted; under DDP the gradients are already
  all-reduced, so every rank accumulates identical statistics with no extra communication.
* ``on_before_optimizer_step`` zeroes the gradients of pruned weights; an optimizer step post-hook re-applies the
  masks, so pruned weights stay exactly zero whatever the optimizer does.
* ``on_train_batch_end`` / ``on_train_epoch_end``: the schedule's events. Each: metric before, new masks (broadcast
  from rank 0), metric after, the gate's verdict (:mod:`lightning_compress.core.gate`); a refused step is rolled
  back exactly (weights and masks) and the schedule backs off or stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.core.accounting import layer_float_bytes
from lightning_compress.core.modules import weight_of
from lightning_compress.core.selection import DEFAULT_MODULE_TYPES, Selection
from lightning_compress.integration import _compat
from lightning_compress.integration.evaluation import DEFAULT_METRIC
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.controller import PruningController
from lightning_compress.pruning.planner import plan_masks
from lightning_compress.pruning.schedule import PruningSchedule
from lightning_compress.pruning.state import MaskState
from lightning_compress.pruning.statistics import GradientStatistics
from lightning_compress.pruning.tracked import TrackedLayers
from lightning_compress.reporting.records import CompressionEvent, LayerRecord

COMPACTED_FILE = "model.compact.safetensors"  # with compact=True, in the run's log directory


class GradientStabilityPruning(CompressionCallback):
    """Prune weights (or whole neurons / channels) whose gradients stay near zero and stable.

    Args (see the README for each): ``sparsity`` (final fraction of the tracked weights, structured: of the
    units; None to prune by ``mean_threshold`` / ``std_threshold``), ``criterion`` (``weighted_stability``
    |w|·(|mean g| + std g), ``stability``, ``magnitude``, ``taylor``), ``structured``, ``scope``, ``schedule``
    (``polynomial`` / ``constant`` / ``one_shot``) with ``schedule_unit``, ``start_step``, ``end_step``,
    ``frequency``, ``amount``, ``initial_sparsity``; ``min_keep`` (per-layer floor), ``restart_statistics``,
    ``statistics`` (``per_weight``: two fp32 buffers per weight; ``per_unit``; ``auto``), ``module_types`` /
    ``include`` / ``exclude`` (lists), ``metric`` / ``metric_kwargs``, ``max_metric_drop`` and ``metric_reference``
    (the gate), ``on_violation`` (``backoff`` / ``stop``), ``evaluate``, ``compact`` (structured: physically remove
    pruned units at the end of fit), ``verbose`` (0 quiet, 1 a line per event, 2 also per-layer sparsity).
    """

    finish_order = 0
    report_name = "pruning"

    def __init__(
        self,
        sparsity: float | None = 0.8,
        criterion: Literal["weighted_stability", "stability", "magnitude", "taylor"] = "weighted_stability",
        structured: bool = False,
        scope: Literal["global", "layer"] = "global",
        schedule: Literal["polynomial", "constant", "one_shot"] = "polynomial",
        schedule_unit: Literal["step", "epoch"] = "step",
        start_step: int | None = None,
        end_step: int | None = None,
        frequency: int | None = None,
        amount: float = 0.2,
        initial_sparsity: float = 0.0,
        mean_threshold: float | None = None,
        std_threshold: float | None = None,
        min_keep: float = 0.0,
        restart_statistics: bool = False,
        statistics: Literal["auto", "per_weight", "per_unit"] = "auto",
        module_types: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        metric: str = DEFAULT_METRIC,
        metric_kwargs: dict[str, Any] | None = None,
        max_metric_drop: float | None = None,
        metric_reference: Literal["previous", "initial"] = "previous",
        on_violation: Literal["backoff", "stop"] = "backoff",
        evaluate: bool = True,
        compact: bool = False,
        verbose: int = 1,
    ) -> None:
        super().__init__(metric, metric_kwargs, max_metric_drop, metric_reference)
        self.config = PruningConfig(
            sparsity, criterion, structured, scope, schedule, schedule_unit, start_step, end_step, frequency, amount,
            initial_sparsity, mean_threshold, std_threshold, min_keep, restart_statistics, statistics, on_violation,
            evaluate, compact, verbose,
        )
        self.selection = Selection.from_args(module_types, include, exclude, DEFAULT_MODULE_TYPES)
        self._pending_state: dict[str, Any] | None = None
        self._reset_run()

    def _reset_run(self, pl_module: pl.LightningModule | None = None, layers: TrackedLayers | None = None) -> None:
        """A fresh run: a callback instance used for a second fit starts from nothing (``state_dict`` marks *)."""
        self.controller = PruningController(self.gate, self.metric_reference, self.config.on_violation)  # *
        self.stats: GradientStatistics | None = None  # *
        self.state = MaskState(pl_module or nn.Module(), layers or TrackedLayers({}), self.config.structured)  # *
        self.schedule: PruningSchedule | None = None
        self._example_input: Any = None
        self._compacted = False

    @property
    def masks(self) -> dict[str, Tensor]:
        return self.state.masks

    @property
    def unit_masks(self) -> dict[str, Tensor]:
        return self.state.unit_masks

    @property
    def layers(self) -> TrackedLayers:
        return self.state.layers

    def current_sparsity(self) -> float:
        return self.state.sparsity()

    def weight_sparsity(self) -> float:
        return self.state.weight_sparsity()

    @property
    @override
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(criterion=c.criterion, structured=c.structured, sparsity=c.sparsity,
                                        selection=self.selection.describe())

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.controller.history

    def settings(self) -> dict[str, Any]:
        return {**self.config.as_dict(), **super().settings(), "module_types": list(self.selection.module_types),
                "include": list(self.selection.include), "exclude": list(self.selection.exclude)}

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._guard_checkpoint_loading(pl_module)
            return
        self._setup_fit(trainer, pl_module, needs_metric=self.config.evaluate or self.max_metric_drop is not None)
        selected = {n: m for n, m in self.selection.select(pl_module).items()
                    if isinstance(getattr(m, "weight", None), Tensor) and weight_of(m).requires_grad}
        if not selected:
            raise ValueError(f"{self.selection.describe()} select no trainable module of {type(pl_module).__name__}: "
                             "nothing to prune")
        self._reset_run(pl_module, TrackedLayers(selected))
        c = self.config
        total = trainer.max_epochs if c.schedule_unit == "epoch" else trainer.estimated_stepping_batches
        length = int(total) if total is not None and total not in (-1, float("inf")) else None
        self.schedule = PruningSchedule.for_fit(
            c.schedule, c.sparsity if c.sparsity is not None else 1.0, length,
            c.schedule_unit, c.start_step, c.end_step, c.frequency, c.amount, c.initial_sparsity,
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = self.layers.weights()
        if self.config.tracks_gradients:
            per_weight = self.config.per_weight_statistics
            self.stats = GradientStatistics(self.layers.names, [w.shape for w in weights], per_weight=per_weight,
                                            per_unit=not per_weight, device=weights[0].device)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        self.state.bind()
        self.state.attach(trainer.optimizers)
        if getattr(pl_module, "example_input_array", None) is not None:
            self._example_input = pl_module.example_input_array

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example_input is None and isinstance(batch, (list, tuple)) and isinstance(batch[0], Tensor):
            self._example_input = batch[0][:2].detach()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stats is None or self.controller.finished(self.schedule) or not _compat.is_last_micro_batch(trainer):
            return
        weights = self.layers.weights()
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
        self.stats.update(grads, weights, grad_scale=_compat.loss_scale(trainer))

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.state.apply_to_grads()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        if self.config.schedule_unit == "step" and self.controller.due(trainer.global_step, self.schedule):
            self._run_pruning_event(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tick = trainer.current_epoch + 1
        if self.config.schedule_unit == "epoch" and self.controller.due(tick, self.schedule):
            self._run_pruning_event(trainer, pl_module, tick)
        pl_module.log("pruning/sparsity", self.current_sparsity(), logger=False)  # for ModelCheckpoint / EarlyStopping

    # ------------------------------------------------------------------ pruning events
    def _run_pruning_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tick: int) -> None:
        if self.config.structured:
            self._analyse(pl_module)
        if self.schedule is None:  # set in setup
            return
        target = self.controller.target(tick, self.schedule)
        before_sparsity = self.current_sparsity()
        if self.config.sparsity is not None and (target is None or target <= before_sparsity + 1e-9):
            return
        evaluating = self._has_val and (self.config.evaluate or self.max_metric_drop is not None)
        before = self._evaluate(trainer, pl_module) if evaluating else None
        new = plan_masks(self.config, pl_module, self.layers, self.stats, self.masks, self.unit_masks,
                         self.state.groups, target)
        new = trainer.strategy.broadcast(new, src=0)  # one decision for all ranks
        undo = self.state.try_masks(*new)
        tried = self.current_sparsity()
        after = self._evaluate(trainer, pl_module) if evaluating else None
        decision = self.controller.conclude(
            tick=tick, step=trainer.global_step, metric_before=before, metric_after=after,
            weights_finite=self.layers.weights_finite(), sparsity_before=before_sparsity, sparsity_tried=tried,
            extra={"weight_sparsity": self.weight_sparsity()},
        )
        if decision.accepted:
            self.state.keep(trainer.optimizers)
            if self.config.restart_statistics and self.stats is not None:
                self.stats.reset()
        else:
            self.state.roll_back(undo)
            rank_zero_warn(f"GradientStabilityPruning: step {tick} to sparsity {tried:.3f} refused: {decision.reason};"
                           f" rolled back ({decision.note})")
        self._record(trainer, pl_module, self.history[-1])

    def _analyse(self, pl_module: pl.LightningModule) -> None:
        if self.state.groups is None and self._example_input is not None:
            try:
                from lightning_compress.structure.dependency import find_unit_groups

                self.state.groups = find_unit_groups(pl_module, self._example_input)
            except Exception as err:  # the analysis is best effort; masking stays correct without it
                rank_zero_warn(f"GradientStabilityPruning: dependency analysis failed ({err}); pruning rows only")
                self.state.groups = {}

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, entry: dict[str, Any]) -> None:
        structured = self.config.structured
        self.report.events.append(CompressionEvent(
            "prune", entry["step"], entry["metric_before"], entry["metric_after"], entry["weight_sparsity"],
            entry["accepted"], "; ".join(x for x in (entry["reason"], entry["note"]) if x), entry["reference"],
            entry["drop"], entry["sparsity"] if structured else None,
        ))
        metrics = {"pruning/sparsity": self.current_sparsity(), "pruning/weight_sparsity": self.weight_sparsity()}
        if entry["metric_after"] is not None:
            metrics[f"pruning/{self.metric_spec.name}"] = entry["metric_after"]
        for name, value in metrics.items():
            pl_module.log(name, value, logger=False)  # callback_metrics: ModelCheckpoint / EarlyStopping can monitor
        metrics.update({f"pruning/sparsity/{n}": s for n, s in self.layers.layer_mask_sparsity(self.masks).items()})
        for logger in trainer.loggers:  # every event reaches the logger, whatever `log_every_n_steps` is
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.config.verbose:
            shown = "" if entry["metric_after"] is None else (
                f", {self.metric_spec.name} {entry['metric_before']:.4f} -> {entry['metric_after']:.4f}")
            rank_zero_info(f"GradientStabilityPruning: step {entry['step']}: sparsity {metrics['pruning/sparsity']:.3f}"
                           f"{' (units)' if structured else ''}{shown}{'' if entry['accepted'] else ' (rolled back)'}")

    # ------------------------------------------------------------------ end of fit
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze the masks into the weights, fill the report's layers and (``compact``) remove pruned units."""
        self.state.detach()
        self.state.apply()
        per_layer = self.layers.layer_mask_sparsity(self.masks)
        for (name, module), weight in zip(self.layers.modules.items(), self.layers.weights()):
            fp32 = layer_float_bytes(module, weight)
            record = self.report.layers.setdefault(name, LayerRecord(parameters=weight.numel(), bytes_fp32=fp32))
            record.sparsity = per_layer[name]
            record.bytes_compressed = record.bytes_compressed or fp32
        if self.config.compact and self.unit_masks:
            from lightning_compress.structure.compaction import compact, save_compacted

            result = compact(pl_module, self.unit_masks, self._example_input, inplace=True)
            rank_zero_info(f"GradientStabilityPruning: compacted the model: {result}")
            self.state.clear()
            self._compacted = True
            path = Path(trainer.log_dir or trainer.default_root_dir) / COMPACTED_FILE
            if trainer.is_global_zero:
                save_compacted(pl_module, path)
            self.report.files["compacted"] = str(path.resolve())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.state.detach()
        super().teardown(trainer, pl_module, stage)

    def checkpoint_details(self) -> dict[str, Any]:
        return {"compacted": self._compacted, "pruned": self.weight_sparsity() if not self._compacted else None}

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict() if self.stats is not None else None, **self.state.state_dict(),
                "controller": self.controller.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)  # applied in on_train_start, once the statistics exist

    def _restore(self, state: dict[str, Any]) -> None:
        if self.stats is not None and state.get("stats") is not None:
            self.stats.load_state_dict(state["stats"])
        self.state.load_state_dict(state)
        self.controller.load_state_dict(state.get("controller", state))  # older checkpoints: flat keys
