"""``AdaptiveCompression``'s files at the end of the fit: the export, measured before it lands at the export path
(:func:`export`, :mod:`lightning_compress.adaptive.delivery`), and its float copy.

The trained float weights (pruned; with a latency budget and caps, of the compacted model) are kept in memory for
``AdaptiveCompression.restore_float`` and, with ``export_path`` and ``save_float_copy``, written beside the export
as ``<name>.fp32.safetensors`` with the export's ``run_id`` (``load_compressed`` reads it, compacted shapes
included). They are float only before the codes are written into them, and a refused fit must leave no file
(nothing outside the budget lands in the run's directory), so rank zero stages the copy in a temporary directory
when the weights are taken and moves it beside the export only once the export was measured within the budget and
written (:mod:`lightning_compress.core.io`'s atomic writer); a refused fit discards it. Before, the fit's trained
float weights existed nowhere once it delivered (review 9 finding 3b).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch

from lightning_compress.adaptive.compress import CompressionResult
from lightning_compress.adaptive.delivery import ExportOutcome, write_within
from lightning_compress.callbacks.adaptive_plan import back_to_floats
from lightning_compress.core.io import check_export_path, write_bytes
from lightning_compress.integration.ranks import on_every_rank
from lightning_compress.quantization.export import new_run_id, save_float

if TYPE_CHECKING:
    from lightning_compress.callbacks.adaptive import AdaptiveCompression

SUFFIX = ".fp32.safetensors"


def float_copy_file(callback: AdaptiveCompression, trainer: pl.Trainer) -> Path | None:
    """Where ``callback``'s float copy goes, ``model.safetensors`` -> ``model.fp32.safetensors`` (as
    PostTrainingQuantization names it), checked in setup like the export (an absolute file that exists is refused);
    None without ``export_path``, with ``save_float_copy=False`` or a latency budget alone (its export is float)."""
    budget = callback.budget
    latency_alone = budget.latency is not None and budget.size is None and budget.macs is None
    if callback.export_path is None or not callback.save_float_copy or latency_alone:
        return None
    path = callback.export_path.removesuffix(".safetensors") + SUFFIX
    folder = callback.run_dir(trainer)
    return on_every_rank(trainer, lambda: check_export_path(path, folder, "export_path (its float copy)",
                                                            create=trainer.is_global_zero),
                         f"the float copy {path!r}")


class FloatCopy:
    """The float state taken before the codes (:attr:`state`), and rank zero's staged file for :attr:`path` (None:
    no copy written). :attr:`run_id` is the export's too."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.state: dict[str, torch.Tensor] = {}
        self.run_id: str | None = None
        self._staged: tempfile.TemporaryDirectory[str] | None = None

    def keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, torch.Tensor]) -> None:
        """``state`` (``pl_module``'s float weights, taken now) kept; with a path, rank zero stages the file (a
        failure ends the fit on every rank: the caller's ``_fail``)."""
        self.state, self.run_id = state, new_run_id()
        if self.path is None:
            return

        def stage() -> None:
            if trainer.is_global_zero:
                self._staged = tempfile.TemporaryDirectory(prefix="lightning_compress_fp32_")
                save_float(pl_module, Path(self._staged.name, "model" + SUFFIX), run_id=self.run_id)

        on_every_rank(trainer, stage, f"the float copy {str(self.path)!r}")

    def write(self, trainer: pl.Trainer) -> None:
        """Rank zero moves the staged copy to :attr:`path` (after the export was written); every rank hears of a
        failure."""
        if self.path is None:
            return
        path, staged = self.path, self._staged

        def move() -> None:
            if staged is not None:
                write_bytes(path, Path(staged.name, "model" + SUFFIX).read_bytes())

        try:
            on_every_rank(trainer, move, f"the write of the float copy {str(path)!r}")
        finally:
            self.discard()

    def discard(self) -> None:
        """The staged file removed (a refused fit, or once written)."""
        if self._staged is not None:
            self._staged.cleanup()
            self._staged = None


def keep_floats(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule,
                floats: dict[str, torch.Tensor]) -> None:
    """``floats`` (the model's float state, taken before the codes) kept for ``restore_float``, the float copy
    staged; a copy that cannot be staged (a full disk) ends the fit on every rank with a FAILED report."""
    try:
        callback.float_copy.keep(trainer, pl_module, floats)
    except Exception as err:
        callback._fail(trainer, pl_module, err)


def export(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule,
           result: CompressionResult, floats: dict[str, torch.Tensor]) -> None:
    """Rank zero measures the model's export, then writes it only if it is within the budget; every rank takes
    rank zero's outcome, so an over-budget file (or a failed write) ends the fit on every rank with a FAILED
    report, no file at the export path, and the float (pruned) weights back in the model. Then the float copy
    beside it."""
    path = callback._export_file
    if path is None:
        return
    written, error = write_within(pl_module, path, result.budget_bytes, callback.budget.size, result.macs,
                                  callback.float_copy.run_id) \
        if trainer.is_global_zero else (ExportOutcome(None), None)  # the others take rank zero's
    outcome = trainer.strategy.broadcast(written, src=0)
    if outcome.failed:
        back_to_floats(pl_module, floats)
        callback.result = None
        callback._fail(trainer, pl_module, error or outcome.error())
    result.file_bytes = outcome.file_bytes
    callback.report.files["quantized"] = str(path.resolve())
    copy = callback.float_copy
    if copy.path is not None:  # beside it, once it was written within the budget
        try:
            copy.write(trainer)
        except Exception as err:
            callback._fail(trainer, pl_module, err)
        callback.report.files["float_copy"] = str(copy.path.resolve())
