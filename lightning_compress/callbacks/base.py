"""What the package's callbacks share: arguments, the ``setup`` preamble, the order in which they finish a fit,
and the one compression report of a fit.

The protocol: every compression callback derives from :class:`CompressionCallback` and implements
``_finish(trainer, pl_module)`` (its last action of the fit). At ``on_train_end`` whichever compression callback
runs first finishes *all* of them in ``finish_order`` (pruning before quantization, whatever order the user listed
them in), then evaluates the delivered model once more and publishes the report. The report belongs to the first
compression callback in ``trainer.callbacks`` (the "leader"); the others reach it through the leader, so nothing
is hung on the ``Trainer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_compress.core.accounting import state_bytes
from lightning_compress.core.gate import REFERENCES, MetricGate
from lightning_compress.core.selection import DEFAULT_MODULE_TYPES, Selection
from lightning_compress.core.validation import check_choice, check_number
from lightning_compress.integration import evaluation
from lightning_compress.integration.artifacts import CHECKPOINT_KEY, checkpoint_entry, prepare_for_checkpoint
from lightning_compress.integration.strategy import check_reparametrization, check_strategy, destroy_gloo_group_at_exit
from lightning_compress.reporting.publish import publish
from lightning_compress.reporting.records import CompressionReport

COMPRESSED_CHECKPOINT = "compressed.ckpt"  # written in the run's log directory at the end of every fit


class CompressionCallback(Callback):
    """Base of :class:`GradientStabilityPruning` and :class:`PostTrainingQuantization` (see the module docstring).

    Args:
        metric / metric_kwargs: torchmetrics metric (class path) measured on the validation data around each step.
        max_metric_drop: the gate's bound, in the metric's units (0.01 = one accuracy point); None = no bound.
        metric_reference: what a step is judged against: ``"previous"`` (the metric measured immediately before
            it) or ``"initial"`` (before the first step).
    """

    finish_order: ClassVar[int] = 0  # lower finishes first at the end of fit
    report_name: ClassVar[str] = "compression"

    def __init__(
        self,
        metric: str = evaluation.DEFAULT_METRIC,
        metric_kwargs: dict[str, Any] | None = None,
        max_metric_drop: float | None = None,
        metric_reference: str = "previous",
    ) -> None:
        super().__init__()
        self.metric_spec = evaluation.MetricSpec(metric, metric_kwargs)
        if max_metric_drop is not None:
            check_number("max_metric_drop", max_metric_drop, low=0)
        check_choice("metric_reference", metric_reference, REFERENCES)
        self.max_metric_drop = max_metric_drop
        self.metric_reference = metric_reference
        self.gate = MetricGate(max_metric_drop, self.metric_spec.higher_is_better)
        self._report: CompressionReport | None = None  # the fit's report, on the leader only
        self._leader: CompressionCallback = self
        self._finished = False
        self._published = False
        self._has_val = False
        self._compressed_module: int | None = None  # id() of the module this callback compressed in memory
        self.selection = Selection(DEFAULT_MODULE_TYPES)  # subclasses set their own

    # ------------------------------------------------------------------ what subclasses provide
    def settings(self) -> dict[str, Any]:
        """The callback's arguments, for the report."""
        return {"metric": self.metric_spec.class_path, "metric_kwargs": self.metric_spec.kwargs,
                "max_metric_drop": self.max_metric_drop, "metric_reference": self.metric_reference}

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The callback's last action of the fit (pruning: freeze masks / compact; quantization: quantize)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ setup
    def _setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, needs_metric: bool) -> None:
        """The shared ``setup`` preamble: refuse what cannot work, before any training step."""
        check_strategy(trainer, type(self).__name__)
        check_reparametrization(trainer, pl_module, type(self).__name__)
        destroy_gloo_group_at_exit()
        self._finished = self._published = False
        self._has_val = evaluation.has_validation_data(trainer, pl_module)
        if self.max_metric_drop is not None and not self._has_val:
            raise ValueError(
                f"`max_metric_drop`={self.max_metric_drop} needs validation data to measure the metric on; allowed: "
                "None (no bound), or give the fit a val_dataloader, a `validation_step` and limit_val_batches > 0"
            )
        if needs_metric and self._has_val:
            evaluation.dry_run(trainer, pl_module, self.metric_spec, argument=f"{type(self).__name__}(metric=...)")
        for line in self.selection.check(pl_module):  # refuses an include / exclude pattern that matches nothing
            rank_zero_info(f"{type(self).__name__}: {line}")
        peers = compression_callbacks(trainer)
        self._leader = peers[0] if peers else self
        if self._leader is self:
            self._report = CompressionReport(model_state_bytes=state_bytes(pl_module))
        report = self.report
        report.settings[self.report_name] = self.settings()
        report.gate[self.report_name] = {"max_metric_drop": self.max_metric_drop, "reference": self.metric_reference}
        if not report.metric_name:
            report.metric_name = self.metric_spec.name
            report.metric_description = self.metric_spec.description
            report.higher_is_better = self.metric_spec.higher_is_better

    @property
    def report(self) -> CompressionReport:
        report = self._leader._report
        if report is None:  # used outside a fit (e.g. a test calling a hook by hand)
            report = self._leader._report = CompressionReport()
        return report

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None, metrics: dict[str, float],
             extra: dict[str, float] | None = None) -> None:
        """``metrics`` into ``callback_metrics`` (``ModelCheckpoint`` / ``EarlyStopping`` can monitor them; only
        where Lightning allows ``self.log``: pass ``pl_module=None`` elsewhere) and, with ``extra``, to every logger
        now, whatever ``log_every_n_steps`` is."""
        if pl_module is not None:
            for name, value in metrics.items():
                pl_module.log(name, value, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, **(extra or {})}, step=trainer.global_step)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        return evaluation.evaluate(trainer, pl_module, self.metric_spec) if self._has_val else None

    def checkpoint_details(self) -> dict[str, Any]:
        """What this callback adds to the ``lightning_compress`` entry of a checkpoint written after compression."""
        return {}

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Mark every checkpoint: ``"training"`` (float weights, pruning in progress: resume from it) or, once the
        fit's compression is done, ``"compressed"`` with what was done (compacted shapes, quantized layers)."""
        stage = "compressed" if self._finished else "training"
        entry = checkpoint.setdefault(CHECKPOINT_KEY, checkpoint_entry(stage))
        if stage == "compressed":
            entry["stage"] = stage
            entry.update(self.checkpoint_details())

    def _guard_checkpoint_loading(self, pl_module: pl.LightningModule) -> None:
        """For ``validate`` / ``test`` / ``predict`` with a ``ckpt_path``: a compressed checkpoint gets the compacted
        shapes it needs before Lightning loads it; a checkpoint from before compression is refused when the model in
        memory is the compressed one (loading it would silently evaluate the float model). Lightning restores a
        checkpoint after the callbacks' ``setup``, through the module's ``on_load_checkpoint``, wrapped here."""
        if "on_load_checkpoint" in vars(pl_module):  # already wrapped (by another compression callback)
            return
        original = pl_module.on_load_checkpoint
        compressed_in_memory = any(c._compressed_module == id(pl_module) for c in (self, self._leader))

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            entry = checkpoint.get(CHECKPOINT_KEY)
            stage = entry.get("stage") if isinstance(entry, dict) else None
            if compressed_in_memory and stage != "compressed":
                raise ValueError(
                    f"`ckpt_path` holds the model as it was during training ({stage or 'no compression entry'}: float "
                    "weights, original shapes), but the model in memory has been compressed by this Trainer's "
                    f"{type(self).__name__}; loading it would evaluate the float model. Allowed: no ckpt_path (the "
                    "compressed model in memory), the fit's `compressed.ckpt`, or "
                    "`lightning_compress.load_compressed(MyModel(), path)` on a fresh model"
                )
            if stage == "compressed":
                prepare_for_checkpoint(pl_module, checkpoint)
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        vars(pl_module).pop("on_load_checkpoint", None)

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_fit(trainer, pl_module)

    def _finish_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        peers = compression_callbacks(trainer) or [self]
        for peer in sorted(peers, key=lambda callback: callback.finish_order):
            if not peer._finished:
                peer._finish(trainer, pl_module)
                peer._finished = True
                peer._compressed_module = id(pl_module)
        leader = self._leader
        if not leader._published:
            leader._published = True
            self._deliver(trainer, pl_module)

    def _deliver(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate the delivered model once more (validation and, when the datamodule has it, test data) and
        publish the report."""
        report = self.report
        if self._has_val:
            report.metric_after = report.delivered_metric = self._evaluate(trainer, pl_module)
        try:
            loaders = evaluation.test_dataloaders(trainer)
            if loaders:
                report.delivered_test_metric = evaluation.evaluate(trainer, pl_module, self.metric_spec, loaders)
        except Exception as err:  # the test figure is extra; a datamodule without test data says so
            rank_zero_warn(f"lightning-compress: could not evaluate the delivered model on the test data: {err!r}")
        path = Path(trainer.log_dir or trainer.default_root_dir) / COMPRESSED_CHECKPOINT
        trainer.save_checkpoint(path)  # every rank calls it; rank zero writes
        report.files["compressed_checkpoint"] = str(path.resolve())
        publish(report, trainer, pl_module)


def compression_callbacks(trainer: pl.Trainer) -> list[CompressionCallback]:
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by a connector, invisible to mypy
    return [callback for callback in callbacks if isinstance(callback, CompressionCallback)]
