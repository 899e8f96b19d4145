"""Every private Lightning attribute lightning_compress relies on, in one place, each behind a function that says
what it is for. ``tests/integration/test_compat.py`` checks each against the installed Lightning, so an upgrade
that moves one fails there, by name, instead of deep inside a fit. Torch's are in
:mod:`lightning_compress.core._compat`.

Verified with Lightning 2.4 - 2.6.
"""

from __future__ import annotations

from typing import Any


def is_last_micro_batch(trainer: Any) -> bool:
    """Whether the optimizer steps after this backward (the last micro-batch of a gradient-accumulation window).
    Lightning decides it in ``_TrainingEpochLoop._should_accumulate`` (private)."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def validation_source_defined(trainer: Any) -> bool:
    """Whether the fit has a validation dataloader source (a datamodule's or the model's ``val_dataloader``),
    before Lightning has loaded it. Read off ``_EvaluationLoop._data_source`` (private)."""
    return bool(trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined())


def progress_bar_console(trainer: Any) -> Any:
    """The rich ``Console`` of a ``RichProgressBar`` (private ``_console``), None for any other progress bar:
    printing beside its live display on another console garbles the terminal."""
    return getattr(trainer.progress_bar_callback, "_console", None)


def loss_scale(trainer: Any) -> float:
    """The loss scale that gradients still carry in ``on_after_backward`` under 16-bit AMP (the precision plugin's
    ``GradScaler``), else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    return 1.0


def training_dataloader(trainer: Any) -> Any:
    """A fresh (first) training dataloader from the fit's source (a datamodule's or the model's
    ``train_dataloader``), before Lightning has loaded it (a dry run in ``setup``); None when the fit has none. Read
    off ``_FitLoop._data_source`` (private)."""
    source = trainer.fit_loop._data_source
    loader = source.dataloader() if source.is_defined() else None
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    return (loader[0] if loader else None) if isinstance(loader, (list, tuple)) else loader


def returns_weights_to_main_process(trainer: Any) -> bool:
    """Whether the fit runs in worker processes whose rank zero's final ``state_dict`` Lightning loads back into
    the main process's model (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``: ``_MultiProcessingLauncher``, private,
    in ``_recover_results_in_main_process``)."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)
