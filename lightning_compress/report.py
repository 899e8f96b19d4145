"""The compression report: one record per fit, filled by whichever compression callbacks ran.

The callbacks append to the :class:`CompressionReport` attached to the trainer (:func:`report_for`); each calls
:func:`finish_if_last` at the end of its work, and the report is finalised once every compression callback of
the trainer is done, whatever order the user listed them in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

_ATTRIBUTE = "_lightning_compress_report"


@dataclass
class CompressionEvent:
    """One compression step: a pruning step or the quantization, with the metric before and after it."""

    kind: str  # "prune" | "quantize"
    step: int  # trainer.global_step when it happened
    metric_before: float | None
    metric_after: float | None
    sparsity: float | None = None  # overall sparsity of the tracked weights after the step
    accepted: bool = True  # False: rolled back because it broke `max_metric_drop`
    note: str = ""


@dataclass
class LayerRecord:
    parameters: int  # weight elements of this layer (bias excluded)
    sparsity: float = 0.0  # fraction of exactly-zero weight elements
    bits: int = 32  # storage bits per weight element (32 = float)
    bytes_fp32: int = 0  # weight + bias bytes in fp32
    bytes_compressed: int = 0  # bytes in the exported artifact (ints + scales/zero points + float bias)
    note: str = ""


@dataclass
class CompressionReport:
    metric_name: str = ""
    higher_is_better: bool = True
    metric_before: float | None = None  # before any compression
    metric_after: float | None = None  # after all of it
    events: list[CompressionEvent] = field(default_factory=list)
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # quantization layers kept at more bits / float
    files: dict[str, str] = field(default_factory=dict)  # artifacts written (export, float copy, ...)
    # every entry of the model's state_dict when the first compression callback registered -> its bytes (floats
    # counted as fp32): the "before" of the whole-model totals, taken before pruning or compaction changed anything
    model_state_bytes: dict[str, int] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)  # compression callbacks still working
    finished: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("pending", "finished", "model_state_bytes"):
            out.pop(key)
        return out


def state_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of every ``state_dict`` entry of ``module``: floating-point tensors counted as fp32 (4 bytes per
    element, whatever their dtype in memory), other tensors (e.g. ``num_batches_tracked``) at their own size.
    A tensor reachable under two keys (tied weights) is counted once, under its first key."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for key, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, Tensor) and id(value) not in seen:
            seen.add(id(value))
            size = 4 if value.is_floating_point() else value.element_size()
            out[key] = size * value.numel()
    return out


def report_for(trainer: pl.Trainer) -> CompressionReport:
    report = getattr(trainer, _ATTRIBUTE, None)
    if report is None:
        report = CompressionReport()
        setattr(trainer, _ATTRIBUTE, report)
    return report


def register(trainer: pl.Trainer, name: str) -> CompressionReport:
    """A compression callback announces (in ``setup``) that the report must wait for it."""
    report = report_for(trainer)
    report.pending.add(name)
    if not report.model_state_bytes:
        module = getattr(trainer, "lightning_module", None)  # connected before the callbacks' `setup` runs
        if module is not None:
            report.model_state_bytes = state_bytes(module)
    return report


def finish_if_last(trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> bool:
    """Mark ``name`` done; when no compression callback is pending any more, finalise the report."""
    report = report_for(trainer)
    report.pending.discard(name)
    if report.pending or report.finished:
        return False
    report.finished = True
    from lightning_compress.report_output import publish

    publish(report, trainer, pl_module)
    return True
