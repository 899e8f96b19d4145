"""Resume a fit from a checkpoint written mid-QAT after ``GradientStabilityPruning(structured=True, compact=True)``
compacted the model (:mod:`lightning_compress.qat.compaction`): the checkpoint holds the compacted shapes, a
resumed fit builds the model at its full widths.

What such a checkpoint carries, in ``QuantizationAwareTraining``'s state under ``"compaction"`` (:func:`snapshot`):
the compaction record (which axes of which ``state_dict`` keys compaction shrank, and their size before), the
pruning masks QAT kept on layers compaction left their shape, and what the pruning callback had finished when it
compacted (the sparsity reached, its per-layer report, the MACs before and after).

How it resumes, in Lightning's restore order:

1. The LightningModule's ``on_load_checkpoint`` runs before Lightning loads the ``state_dict``
   (``_CheckpointConnector.restore_model``): :func:`shrink_on_resume` wraps it to shrink the model to the
   checkpoint's shapes under that record, through the one shape rule of every loader
   (:func:`~lightning_compress.structure.serialization.shrink_to_state_dict`: only recorded axes, only from the
   model's size as built, checked before anything changes). The ``state_dict`` then loads strictly.
2. The strategy builds the optimizer after the restore of the model (``strategy.setup``), so over the compacted
   parameters, in the order the checkpoint's moments were written in; Lightning restores them.
3. When QAT starts again, :func:`restore` puts the pruning callback back in the state it had after compacting
   (finished, nothing left to mask, its report) instead of compacting a second time.

A checkpoint with compacted shapes and no record (written by a version that refused to resume it) is refused as
before (:func:`~lightning_compress.qat.compaction.check_not_compacted`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_compress.core.io import UntrustedFileError
from lightning_compress.qat.compaction import check_masks_fit, check_not_compacted, parse_snapshot
from lightning_compress.qat.fake_quant import LSQFakeQuantizer
from lightning_compress.structure.serialization import shrink_to_state_dict
from lightning_compress.structure.shape_rules import compacted_axes, encode

if TYPE_CHECKING:  # the callbacks import this package, not the other way round
    from lightning_compress.callbacks.pruning import GradientStabilityPruning

KEY = "compaction"  # where QuantizationAwareTraining's state holds the snapshot


def snapshot(
    pruning: GradientStabilityPruning, quantizers: Mapping[str, LSQFakeQuantizer], keys: Mapping[str, str]
) -> dict[str, Any]:
    """What a mid-QAT checkpoint needs to resume a fit that ``pruning`` compacted: plain values and CPU tensors.
    ``quantizers``: QAT's, by module name; ``keys``: module name -> its weight's ``state_dict`` key."""
    report, masks = pruning.report, {keys[name]: q.mask for name, q in quantizers.items() if q.mask is not None}
    return {"axes": dict(pruning._compacted_axes),
            "masks": {key: mask.detach().cpu().bool().clone() for key, mask in masks.items()},
            "final": list(pruning._final or (0.0, 0.0)),
            "macs": [report.macs_before, report.macs_after],
            "file": Path(report.files["compacted"]).name,
            "layers": {name: [report.layers[name].parameters, report.layers[name].bytes_fp32,
                              report.layers[name].sparsity, report.layers[name].note]
                       for name in pruning.layers.names if name in report.layers}}


def shrink_on_resume(pl_module: pl.LightningModule, state_key: str) -> Callable[[], None]:
    """Wrap ``pl_module.on_load_checkpoint`` (until the returned function is called) so that a checkpoint whose
    callback state ``state_key`` holds a compaction snapshot shrinks the model to its shapes before Lightning loads
    it, the snapshot checked first; one without a snapshot but with compacted shapes is refused. Both before any
    tensor is copied."""
    previous, wrapped = pl_module.on_load_checkpoint, "on_load_checkpoint" in vars(pl_module)

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        previous(checkpoint)
        source = f"checkpoint {str(getattr(pl_module.trainer, 'ckpt_path', None))!r}"
        weights = checkpoint.get("state_dict")
        if not isinstance(weights, dict):
            raise UntrustedFileError(f"{source}: 'state_dict' must map names to tensors, got {type(weights).__name__}")
        state = (checkpoint.get("callbacks") or {}).get(state_key)
        if not (isinstance(state, dict) and state.get("active") and KEY in state):
            check_not_compacted(weights, pl_module, source)
            return
        field = f"callbacks[{state_key!r}].{KEY}"
        saved = parse_snapshot(source, state[KEY], field)
        check_masks_fit(source, saved["masks"], weights, field)
        shrink_to_state_dict(pl_module, weights, saved["axes"], source=source)

    pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    def remove() -> None:
        if vars(pl_module).get("on_load_checkpoint") is not on_load_checkpoint:
            return  # unwrapped already (the callbacks' teardown)
        if wrapped:
            pl_module.on_load_checkpoint = previous  # type: ignore[method-assign]
        else:
            del pl_module.on_load_checkpoint

    return remove


def restore(
    trainer: pl.Trainer, prunings: Iterable[GradientStabilityPruning], snapshot: Any
) -> tuple[GradientStabilityPruning, dict[str, Tensor]]:
    """Put the compacting one of ``prunings`` (the Trainer's pruning callbacks) back in the state it had after
    compacting (finished, its masks cleared, its report's layers, sparsity and MACs as they were); returns it and
    QAT's keep-masks. ``snapshot``: what :func:`snapshot` wrote (checked again)."""
    peers = [p for p in prunings if p.config.compact]
    if len(peers) != 1:
        raise ValueError(f"the checkpoint was written after GradientStabilityPruning(compact=True) compacted the "
                         f"model; this Trainer has {len(peers)} such callbacks, allowed: the one of the fit resumed")
    pruning, saved = peers[0], parse_snapshot(str(trainer.ckpt_path), snapshot, KEY)
    pruning.state.detach()
    pruning.state.clear()
    pruning._final = saved["final"]
    pruning._compacted = True
    pruning._compacted_axes = encode(compacted_axes(trainer.lightning_module))
    report = pruning.report
    report.macs_before, report.macs_after = saved["macs"]
    for name, (parameters, fp32, sparsity, note) in saved["layers"].items():
        record = report.record_layer(name, parameters, fp32)
        record.sparsity, record.note = float(sparsity), note
    report.files["compacted"] = str((Path(pruning.run_dir(trainer)) / saved["file"]).resolve())
    return pruning, saved["masks"]
