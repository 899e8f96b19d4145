"""Shared test helpers: quiet Trainers, small callbacks used by several test modules, the fit's report."""

from __future__ import annotations

import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_compress.callbacks.base import compression_callbacks
from lightning_compress.reporting.records import CompressionReport

QUIET_TRAINER: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "logger": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
}


def quiet_trainer(callbacks: list[Callback], max_epochs: int = 2, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer with no progress bar, summary, logger or checkpoints; the report goes to a fresh temp dir."""
    defaults: dict[str, Any] = {
        **QUIET_TRAINER,
        "max_epochs": max_epochs,
        "deterministic": True,
        "default_root_dir": tempfile.mkdtemp(prefix="lc-test-"),
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def report_of(trainer: pl.Trainer) -> CompressionReport:
    """The compression report of the trainer's last fit (held by its first compression callback)."""
    return compression_callbacks(trainer)[0].report


class StopAfterEpoch(Callback):
    """Ends the fit after ``epoch`` (0-based), as a crash or a pre-emption would, leaving its checkpoint."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class GradSpy(Callback):
    """Records the gradient the optimizer really uses (in ``on_before_optimizer_step``) of one module's weight."""

    def __init__(self, module_name: str) -> None:
        self.module_name = module_name
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        weight = dict(pl_module.named_modules())[self.module_name].weight
        self.grads.append(weight.grad.detach().clone())
