"""The export at the end of a budgeted fit, measured before it lands at the export path. No Lightning import.

The file is first written into a temporary directory (exactly what ``save_quantized`` / ``save_float`` write) and
measured against the size cap; only a file within the cap is then written at the export path, with the one atomic
writer. An over-budget export therefore leaves nothing at the path. One rank writes; :class:`ExportOutcome` is plain
data, so the writing rank can broadcast it and every rank ends the fit the same way (a rank raising alone would leave
the others waiting in the next collective).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lightning_compress.adaptive.costs import write_file
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.core.io import write_bytes


@dataclass(frozen=True)
class ExportOutcome:
    """What writing the export came to: ``file_bytes`` measured (None when nothing could be measured) and, when it
    failed, the error as plain values (``kind``: ``"budget"``, ``"os"`` or the exception's type name)."""

    file_bytes: int | None
    kind: str | None = None
    message: str = ""
    smallest: tuple[int | None, int | None] | None = None  # a BudgetError's nearest budget known to hold
    os_error: tuple[int | None, str | None, str | None] | None = None  # errno, strerror, filename

    @property
    def failed(self) -> bool:
        return self.kind is not None

    def error(self) -> Exception:
        """The failure as an exception, rebuilt from plain values (on ranks that did not write)."""
        if self.kind == "budget":
            return BudgetError(self.message, self.smallest)
        if self.kind == "os" and self.os_error is not None:
            errno, strerror, filename = self.os_error
            return OSError(errno, strerror or self.message, filename)
        return RuntimeError(f"the export could not be written (on the writing rank): {self.kind}: {self.message}")


def write_within(model: nn.Module, path: Path, size_cap: int | None, budget: object,
                 macs: int | None = None, run_id: str | None = None) -> tuple[ExportOutcome, Exception | None]:
    """Write ``model``'s export (its codes, else its float ``state_dict``) to ``path`` if it is at most ``size_cap``
    bytes (None: no cap). Returns the outcome and, on failure, the original exception (for the writing rank to
    raise); nothing is raised here. ``budget`` and ``macs`` (the delivered MACs per example) go into the message;
    ``run_id`` into the file (its float copy's too)."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            staged = Path(folder, "export.safetensors")
            size = write_file(model, staged, run_id=run_id).stat().st_size  # all layers float: save_float
            if size_cap is not None and size > size_cap:
                outcome = over_budget(path, size, size_cap, budget, macs)
                return outcome, outcome.error()
            write_bytes(path, staged.read_bytes())
        return ExportOutcome(size), None
    except OSError as err:
        return ExportOutcome(None, "os", str(err), os_error=(err.errno, err.strerror, err.filename)), err
    except Exception as err:  # e.g. codes the model no longer matches: every rank must still hear of it
        return ExportOutcome(None, type(err).__name__, str(err)), err


def over_budget(path: Path, size: int, size_cap: int, budget: object, macs: int | None) -> ExportOutcome:
    """The refusal of an export measured over the cap: the budget, the bytes measured, and the nearest budget known
    to hold (this plan's own size: the plan the verification accepted)."""
    message = (f"`budget` size={budget!r} ({size_cap} bytes): the export measured {size} bytes before it was written "
               f"({size - size_cap} over), so nothing was written at {os.fspath(path)!r}; the nearest budget known "
               f"to hold: size={size} (this plan's own file, as verified)")
    return ExportOutcome(size, "budget", message, smallest=(size, macs))
