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
from typing import Any, ClassVar, NoReturn

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
from lightning_compress.integration.compressed_checkpoint import pack, refuse_resume
from lightning_compress.integration.strategy import check_reparametrization, check_strategy, destroy_gloo_group_at_exit
from lightning_compress.quantization.checks import non_finite_parameters, shown
from lightning_compress.reporting.publish import announce, decide_run_dir, save_report
from lightning_compress.reporting.records import CompressionReport

COMPRESSED_CHECKPOINT = "compressed.ckpt"  # written in the run's directory at the end of every fit
_NO_TRAINING = ("max_epochs", "max_steps", "limit_train_batches")  # Trainer arguments whose 0 runs no step


class ModelNotFiniteError(RuntimeError):
    """The model is not finite when the fit would deliver it: no compressed artifact is written for it."""


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
        self._run_dir: Path | None = None  # where this fit's files go; decided by the leader in setup
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
        check_trains(trainer, type(self).__name__)
        check_reparametrization(trainer, pl_module, type(self).__name__)
        destroy_gloo_group_at_exit()
        self._guard_checkpoint_loading(pl_module, fitting=True)  # fit(ckpt_path=compressed.ckpt) is refused
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
            self._run_dir = decide_run_dir(trainer)  # every rank (a broadcast); once per fit, before any step
        report = self.report
        report.settings[self.report_name] = self.settings()
        report.gate[self.report_name] = {"max_metric_drop": self.max_metric_drop, "reference": self.metric_reference}
        if not report.metric_name:
            report.metric_name = self.metric_spec.name
            report.metric_description = self.metric_spec.description
            report.higher_is_better = self.metric_spec.higher_is_better

    def run_dir(self, trainer: pl.Trainer) -> Path:
        """The directory of this fit's files (decided once per fit by the leader, see
        :func:`~lightning_compress.reporting.publish.decide_run_dir`): every writer of the package uses it."""
        if self._leader._run_dir is None:  # a hook called outside a fit (a test calling it by hand)
            self._leader._run_dir = decide_run_dir(trainer)
        return self._leader._run_dir

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
        fit's compression is done, ``"compressed"`` with what was done (compacted shapes, quantized layers), packed
        (:mod:`~lightning_compress.integration.compressed_checkpoint`: codes, no optimizer state)."""
        stage = "compressed" if self._finished else "training"
        entry = checkpoint.setdefault(CHECKPOINT_KEY, checkpoint_entry(stage))
        if stage == "compressed":
            entry["stage"] = stage
            entry.update(self.checkpoint_details())
            pack(checkpoint, pl_module)

    def _guard_checkpoint_loading(self, pl_module: pl.LightningModule, *, fitting: bool = False) -> None:
        """For ``validate`` / ``test`` / ``predict`` with a ``ckpt_path``: a compressed checkpoint gets the compacted
        shapes it needs before Lightning loads it; a checkpoint from before compression is refused when the model in
        memory is the compressed one (loading it would silently evaluate the float model). Lightning restores a
        checkpoint after the callbacks' ``setup``, through the module's ``on_load_checkpoint``, wrapped here.
        ``fitting``: only a compressed checkpoint is refused (not one to resume from)."""
        if "on_load_checkpoint" in vars(pl_module):  # already wrapped (by another compression callback)
            return
        original = pl_module.on_load_checkpoint
        compressed_in_memory = any(c._compressed_module == id(pl_module) for c in (self, self._leader))

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            if fitting:
                refuse_resume(checkpoint, str(getattr(pl_module.trainer, "ckpt_path", None)))
                return original(checkpoint)
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
            prepare_for_checkpoint(pl_module, checkpoint)  # any stage: entry, hyper-parameters, the shape rule
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        vars(pl_module).pop("on_load_checkpoint", None)

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_fit(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning skips the training loop, ``on_train_end`` included, when there is nothing to train (an empty
        train dataloader, a resumed checkpoint already at ``max_epochs`` / ``max_steps``): say so, instead of a fit
        that ends normally having compressed nothing."""
        if not self._finished:
            raise RuntimeError(
                f"{type(self).__name__} never ran: the fit trained no step (the train dataloader has no batches, or "
                f"the checkpoint it resumed from had already reached max_epochs / max_steps, global_step "
                f"{trainer.global_step}), so nothing was compressed and no {COMPRESSED_CHECKPOINT} was written; "
                "allowed: a fit that trains at least one step"
            )

    def _finish_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        peers = compression_callbacks(trainer) or [self]
        try:
            for peer in sorted(peers, key=lambda callback: callback.finish_order):
                if not peer._finished:
                    peer._finish(trainer, pl_module)
                    peer._finished = True
                    peer._compressed_module = id(pl_module)
        except (OSError, ModelNotFiniteError) as err:  # an export not written (a full disk), a diverged model
            self._fail(trainer, pl_module, err)
        leader = self._leader
        if not leader._published:
            leader._published = True
            self._deliver(trainer, pl_module)

    def _deliver(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate the delivered model once more (validation and, when the datamodule has it, test data), then
        write the report (first: it is small, and says what the fit did even when the disk fills up), then
        ``compressed.ckpt``, then the report again with its size, and print it. A model that is not finite is
        delivered as nothing: no checkpoint, and the fit raises."""
        report = self.report
        if broken := non_finite_parameters(pl_module):
            self._fail(trainer, pl_module, ModelNotFiniteError(
                f"the model is not finite at the end of the fit (NaN / inf in {shown(broken)}): the fit diverged, so "
                f"no compressed model is delivered and no {COMPRESSED_CHECKPOINT} is written (fp16 parameters with "
                "Adam(W)? a learning rate too high?)"))
        if self._has_val:
            report.metric_after = report.delivered_metric = self._evaluate(trainer, pl_module)
        try:
            loaders = evaluation.test_dataloaders(trainer)
            if loaders:
                report.delivered_test_metric = evaluation.evaluate(trainer, pl_module, self.metric_spec, loaders)
        except Exception as err:  # the test figure is extra; a datamodule without test data says so
            rank_zero_warn(f"lightning-compress: could not evaluate the delivered model on the test data: {err!r}")
        directory = self.run_dir(trainer)
        path = directory / COMPRESSED_CHECKPOINT
        report.files["compressed_checkpoint"] = str(path.resolve())
        save_report(report, pl_module, directory)
        try:
            trainer.save_checkpoint(path)  # every rank calls it; rank zero writes
        except OSError as err:
            self._fail(trainer, pl_module, err if err.filename else OSError(err.errno, err.strerror, str(path)))
        announce(save_report(report, pl_module, directory, plot=False), trainer)  # with the checkpoint's size

    def _fail(self, trainer: pl.Trainer, pl_module: pl.LightningModule, error: Exception) -> NoReturn:
        """End the fit with ``error``, after writing a report that says so (what failed and why; no compressed
        checkpoint listed): the events and the pruning history survive a full disk. The report is small, but the
        disk may be full: a report that cannot be written warns, and ``error`` is raised all the same."""
        report = self.report
        report.failure = f"{type(error).__name__}: {error}"
        report.files.pop("compressed_checkpoint", None)
        self._leader._published = True
        try:
            save_report(report, pl_module, self.run_dir(trainer), plot=False)
        except OSError as err:
            rank_zero_warn(f"lightning-compress: could not write the compression report either: {err}")
        raise error


def check_trains(trainer: pl.Trainer, callback: str) -> None:
    """Refuse a fit that runs no training step (``max_epochs=0``, ``max_steps=0``, ``limit_train_batches=0``): the
    callbacks would never run and nothing would be compressed, without a word."""
    for name in _NO_TRAINING:
        value = getattr(trainer, name)
        if value == 0:
            raise ValueError(
                f"Trainer(`{name}`={value!r}) runs no training step, so {callback} would never run and nothing would "
                f"be compressed; allowed: `{name}` > 0 (or leave it at its default)"
            )


def compression_callbacks(trainer: pl.Trainer) -> list[CompressionCallback]:
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by a connector, invisible to mypy
    return [callback for callback in callbacks if isinstance(callback, CompressionCallback)]
