"""The pruning callback's events: when they run (per step, per epoch, at a validation), how the gate's metric is
measured around them (:mod:`lightning_compress.integration.gate_evaluation`), what is logged and reported, and the
target compared with what the fit delivered. The base of ``GradientStabilityPruning``, which sets up the run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_compress.callbacks.base import CompressionCallback, compression_callbacks
from lightning_compress.integration.gate_evaluation import EventEvaluation, ValidationTap
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.run import PruningRun
from lightning_compress.pruning.schedule import PruningSchedule
from lightning_compress.reporting.records import CompressionEvent
from lightning_compress.reporting.render import pruning_line


class PruningEvents(CompressionCallback):
    """Hooks and bookkeeping of the pruning events; the subclass builds ``run`` and ``config``."""

    run: PruningRun
    config: PruningConfig
    _tap: ValidationTap  # the gate's metric during Lightning's validation loop
    _optimizer_steps: int  # weights changed since a validation: its metric is no "before" any more
    _final: tuple[float, float] | None  # (sparsity, weight sparsity) delivered, once finished
    _aligned = False  # per-step events wait for their epoch's validation (decided in on_train_start)
    _compacted: bool  # the pruned units were removed at the end (the model is no longer the one validated)

    controller = property(lambda self: self.run.controller, doc="accept / roll back / back off, and the history")
    state = property(lambda self: self.run.state, doc="the masks in force")
    stats = property(lambda self: self.run.stats, doc="the gradient statistics")
    schedule = property(lambda self: self.run.schedule, doc="when and how much")
    masks = property(lambda self: self.run.state.masks, doc="parameter name -> bool keep-mask")
    unit_masks = property(lambda self: self.run.state.unit_masks, doc="structured: module name -> keep-mask")
    layers = property(lambda self: self.run.layers, doc="the tracked layers")
    history = property(lambda self: self.run.controller.history, doc="one entry per pruning event")

    def current_sparsity(self) -> float:
        """Fraction pruned (structured: of the units); after the fit, what the fit delivered (the masks are gone
        once compaction removed what they pruned)."""
        return self._final[0] if self._final is not None else self.state.sparsity()

    def weight_sparsity(self) -> float:
        return self._final[1] if self._final is not None else self.state.weight_sparsity()

    # ------------------------------------------------------------------ the gate's metric during validation
    _rewrites = 0  # weight writes by compression after the fit (AdaptiveCompression's codes)

    def _weights_version(self) -> tuple[int, int]:
        """(weight changes: optimizer steps and compression's writes, kept events): a validation measured these
        weights only while this is what it was then."""
        return self._optimizer_steps + self._rewrites, sum(1 for h in self.history if h["accepted"])

    def _event_after_validation(self, trainer: pl.Trainer) -> bool:
        """Whether an event is expected right after this validation (a retry; a per-epoch event at this epoch), or
        it is the fit's last, whose value can be the delivered model's (:meth:`_evaluate`)."""
        if trainer.state.fn == "fit" and _last_epoch(trainer):
            return True
        if trainer.state.fn != "fit" or self.schedule is None or self.controller.stopped:
            return False
        if self.controller.retry_at is not None or self.controller.deferred:
            return True
        tick = trainer.current_epoch + 1
        return self.config.schedule_unit == "epoch" and tick != self.controller.last_tick and \
            self.schedule.is_event(tick)

    @override
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """The delivered model's metric: the fit's last validation's value when it measured these very weights (no
        optimizer step and no kept event since, nothing compacted, no other compression callback to change them
        after pruning), else a full evaluation."""
        alone = compression_callbacks(trainer) in ([], [self])
        reused = self._tap.reusable(self._weights_version()) if alone and not self._compacted else None
        return reused[0] if reused is not None else super()._evaluate(trainer, pl_module)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tap.start(trainer, pl_module, wanted=self._event_after_validation(trainer))

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._tap.update(trainer, pl_module, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tap.end(trainer, self._weights_version())

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        if self.config.schedule_unit == "step" and self.controller.due(trainer.global_step, self.schedule):
            if self._aligned and self._validates_at_epoch_end(trainer):
                self.controller.deferred = True  # run in on_validation_end, "before" measured by the loop
            else:
                self._run_pruning_event(trainer, pl_module, trainer.global_step)

    def _decide_alignment(self, trainer: pl.Trainer) -> None:
        """Whether per-step events wait for their epoch's validation in this fit (``align_events``; None: decided
        here), and why, in the report's settings."""
        aligned, rule = self.config.align_events, "set by align_events"
        if aligned is None:
            aligned, rule = auto_alignment(trainer, self.config, self.schedule, self._has_val)
        self._aligned = bool(aligned)
        self.report.settings[self.report_name].update(events_aligned=self._aligned, events_aligned_by=rule)

    def _validates_at_epoch_end(self, trainer: pl.Trainer) -> bool:
        """Whether this epoch ends with a validation the fit surely reaches (no ``max_steps`` cut, validation once
        per epoch, this epoch one of them)."""
        every = trainer.check_val_every_n_epoch
        return (self._has_val and trainer.max_steps in (-1, None) and trainer.val_check_interval == 1.0
                and every is not None and (trainer.current_epoch + 1) % every == 0)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tick = trainer.current_epoch + 1
        # the schedule's event, or a refused step's retry: the epoch's end follows its validation
        if self.config.schedule_unit == "epoch" and self.controller.due(tick, self.schedule, validated=True):
            self.run.validated = self._validates_at_epoch_end(trainer)
            try:
                self._run_pruning_event(trainer, pl_module, tick)
            finally:
                self.run.validated = False
        pl_module.log("pruning/sparsity", self.current_sparsity(), logger=False)  # for ModelCheckpoint / EarlyStopping

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A refused step is retried at the first validation after it, and ``align_events`` runs the epoch's
        deferred event here (per-step schedules; per-epoch ones run at the epoch's end, after its validation)."""
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.config.schedule_unit != "step":
            return
        self.run.validated_at = trainer.global_step
        if self.controller.due(trainer.global_step, self.schedule, validated=True):
            with torch.inference_mode(False):  # Lightning validates under inference mode: the masks must be usable
                self.run.validated = True  # the event's "before" is this validation's metric
                try:
                    self._run_pruning_event(trainer, pl_module, trainer.global_step, loggable=False)  # by training
                finally:
                    self.run.validated = False

    # ------------------------------------------------------------------ pruning events
    def _run_pruning_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tick: int,
                           loggable: bool = True) -> None:
        """One event; ``loggable``: the hook allows ``self.log`` (``on_validation_end`` does not)."""
        evaluating = self._has_val and (self.config.evaluate or self.max_metric_drop is not None)
        version = self._weights_version()
        measure = EventEvaluation(trainer, pl_module, self.metric_spec, self._tap.reusable(version),
                                  self.config.gate_batches, self._allowed_drop,
                                  record=self._tap.reusable_record(version))
        steps = iter((measure.before, measure.after))
        entry = self.run.event(tick, trainer.global_step, lambda: next(steps)() if evaluating else None,
                               lambda masks: trainer.strategy.broadcast(masks, src=0), trainer.optimizers)
        if entry is None:
            return
        entry.update(gate_evaluation=measure.describe(), gate_passes=measure.evaluations, gate_samples=measure.samples)
        if not entry["accepted"]:
            rank_zero_warn(f"GradientStabilityPruning: step {tick} to sparsity {entry['sparsity_tried']:.3f} refused: "
                           f"{entry['reason']}; rolled back ({entry['note']})")
        self._record(trainer, pl_module, entry, loggable, measure.estimate)

    def _allowed_drop(self, before: float) -> float | None:
        """How far below ``before`` the metric after the step may fall for the gate to keep it (None: no bound)."""
        if self.max_metric_drop is None:
            return None
        initial = self.controller.initial_metric
        reference = initial if self.metric_reference == "initial" and initial is not None else before
        return self.max_metric_drop - (self.gate.drop(reference, before) or 0.0)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, entry: dict[str, Any],
                loggable: bool = True, estimate: dict[str, Any] | None = None) -> None:
        """Report and log one event; ``estimate``: the gate's "after" saw part of the set, so the metric after
        the step is reported and logged as an estimate (``pruning/<metric>_estimate``), not as the metric."""
        event = CompressionEvent.from_pruning(entry, self.config.structured)
        if entry.get("gate_evaluation"):  # which rule measured the metric, on how many samples
            event.note = "; ".join(text for text in (event.note, entry["gate_evaluation"]) if text)
        if estimate is not None:
            event.estimated(estimate)
        self.report.events.append(event)
        metrics = {"pruning/sparsity": self.current_sparsity(), "pruning/weight_sparsity": self.weight_sparsity()}
        if entry["metric_after"] is not None:
            suffix = "_estimate" if estimate is not None else ""
            metrics[f"pruning/{self.metric_spec.name}{suffix}"] = entry["metric_after"]
        per_layer = self.layers.layer_mask_sparsity(self.masks)
        self._log(trainer, pl_module if loggable else None, metrics,
                  {f"pruning/sparsity/{n}": s for n, s in per_layer.items()})
        if self.config.verbose:
            rank_zero_info(pruning_line(entry, self.metric_spec.name, metrics["pruning/sparsity"],
                                        self.config.structured, per_layer if self.config.verbose > 1 else None,
                                        estimate))

    def _check_target(self, delivered: float) -> None:
        """Compare what the fit delivered with the target: the report's headline says both, and a shortfall warns
        once, naming the refused events and why."""
        target = self.config.sparsity
        short = self.controller.shortfall(target, delivered)
        self.report.gate.setdefault(self.report_name, {}).update(target_sparsity=target,
                                                                 delivered_sparsity=delivered, shortfall=short)
        if short is not None:
            rank_zero_warn(f"GradientStabilityPruning: the fit fell short of its target: {short}")


def _last_epoch(trainer: pl.Trainer) -> bool:
    """Whether this is the fit's last epoch by ``max_epochs`` (no ``max_steps`` that could end it earlier)."""
    epochs = trainer.max_epochs
    return epochs not in (None, -1) and trainer.max_steps in (-1, None) and trainer.current_epoch + 1 >= epochs


def auto_alignment(trainer: pl.Trainer, config: PruningConfig, schedule: PruningSchedule | None,
                   has_val: bool) -> tuple[bool, str]:
    """``align_events=None``: align per-step events with the epochs' validations when the user gave no per-step
    schedule (no ``start_step`` / ``end_step`` / ``frequency``: the default ramp's exact steps were never asked
    for), the fit validates at every epoch's end and nothing cuts it short, and the epoch of the schedule's last
    event is not the fit's last (the merged last event still leaves an epoch to recover in). Returns the decision and
    the reason, for the report."""
    explicit = [n for n in ("start_step", "end_step", "frequency") if getattr(config, n) is not None]
    every_epoch = (trainer.val_check_interval, trainer.check_val_every_n_epoch) == (1.0, 1)
    epochs, last = trainer.max_epochs, schedule.last_tick() if schedule is not None else None
    why_not = (
        "schedule_unit='epoch'" if config.schedule_unit != "step"
        else f"explicit per-step schedule ({', '.join(explicit)})" if explicit
        else "no validation data" if not has_val
        else "max_steps set" if trainer.max_steps not in (-1, None)
        else "validation not once per epoch" if not every_epoch
        else None
    )
    if why_not is None:
        if epochs is None or epochs < 1:
            why_not = "fit length unknown"
        elif last is None:
            why_not = "the schedule has no last event (it prunes until the fit ends)"
        else:
            last_epoch = -(-last // max(1, int(trainer.estimated_stepping_batches) // epochs))
            if last_epoch >= epochs:
                why_not = f"the last event falls in the fit's last epoch ({epochs}): no epoch left to recover in"
    if why_not is not None:
        return False, f"auto: off ({why_not})"
    return True, "auto: on (no per-step schedule given; each epoch's events run at its validation)"
