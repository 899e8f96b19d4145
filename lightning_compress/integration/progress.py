"""A per-layer progress bar for long compression work after the fit (GPTQ), in the Trainer's own style: a tqdm bar
under ``TQDMProgressBar``, a transient rich bar on the console of ``RichProgressBar``, nothing without a progress
bar or off rank zero."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lightning_compress.integration import _compat

Progress = Callable[[int, int, str], None]  # (done, total, current item's name)


@contextmanager
def layer_progress(trainer: pl.Trainer, total: int, description: str) -> Iterator[Progress]:
    """Yields ``progress(done, total, name)``; the bar is closed on exit, whatever happens inside."""
    bar = trainer.progress_bar_callback if trainer.is_global_zero else None
    if isinstance(bar, RichProgressBar):
        with _rich_bar(trainer, total, description) as update:
            yield update
    elif isinstance(bar, TQDMProgressBar):
        tqdm = Tqdm(total=total, desc=description, unit="layer", leave=False, dynamic_ncols=True)

        def update(done: int, total: int, name: str) -> None:
            tqdm.total = total
            tqdm.set_postfix_str(name, refresh=False)
            tqdm.update(done - tqdm.n)

        try:
            yield update
        finally:
            tqdm.close()
    else:  # no progress bar, not rank zero, or a user's own bar (no second one beside it)
        yield _silent


def _silent(done: int, total: int, name: str) -> None:
    pass


@contextmanager
def _rich_bar(trainer: pl.Trainer, total: int, description: str) -> Iterator[Progress]:
    from rich.errors import LiveError
    from rich.progress import Progress as RichProgress

    console: Any = _compat.progress_bar_console(trainer)  # None: rich's global console
    progress = RichProgress(console=console, transient=True)
    try:
        progress.start()
    except LiveError:  # an older rich that cannot nest live displays: no bar
        yield _silent
        return
    task = progress.add_task(description, total=total)
    try:
        yield lambda done, total, name: progress.update(task, completed=done, total=total,
                                                        description=f"{description} {name}")
    finally:
        progress.stop()
