"""Every private Lightning touchpoint in ``integration/_compat`` still exists in the installed Lightning."""

from __future__ import annotations

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_compress.integration import _compat


class _Probe(pl.Callback):
    def __init__(self) -> None:
        self.last_micro_batch: list[bool] = []
        self.val_defined: bool | None = None
        self.scale: float | None = None
        self.train_batch: torch.Tensor | None = None

    def setup(self, trainer, pl_module, stage):
        self.val_defined = _compat.validation_source_defined(trainer)
        self.train_batch = next(iter(_compat.training_dataloader(trainer)))  # before Lightning loads it

    def on_after_backward(self, trainer, pl_module):
        self.last_micro_batch.append(_compat.is_last_micro_batch(trainer))
        self.scale = _compat.loss_scale(trainer)


def test_lightning_touchpoints(tmp_path) -> None:
    probe = _Probe()
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[probe], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(BoringModel())
    assert probe.last_micro_batch == [False, True, False, True], lightning.__version__
    assert probe.val_defined is True and probe.scale == 1.0
    assert probe.train_batch is not None and tuple(probe.train_batch.shape) == (1, 32)  # BoringModel's batch


def test_rich_progress_bar_console_is_found(tmp_path) -> None:
    from rich.console import Console

    bar = RichProgressBar()
    trainer = pl.Trainer(max_steps=1, callbacks=[bar], logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(BoringModel())
    assert _compat.progress_bar_console(trainer) is None or isinstance(_compat.progress_bar_console(trainer), Console)
    bar._init_progress(trainer)  # the console exists while the live display runs
    assert isinstance(_compat.progress_bar_console(trainer), Console)
    assert torch  # torch's own touchpoints: tests/core/test_compat.py
