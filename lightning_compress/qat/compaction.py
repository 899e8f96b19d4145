"""Quantization-aware training on a model that structured pruning compacts in the same fit. No Lightning.

Compaction removes the pruned units: the weights get new, smaller shapes, as new ``nn.Parameter`` objects. QAT's
codes and scales are shaped like the weights they quantize, so the model is compacted when QAT starts (pruning is
over by then), and the fake quantizers are put on the compacted layers: the codes QAT trains are the delivered
model's. The fit's optimizer still holds the old parameters: :func:`follow_parameters` points it at the new ones
(their moments restart: the old ones have the old shapes); :func:`masks_after` keeps the pruning masks of the
layers compaction left their shape (units it could not remove stay zero through QAT).

A checkpoint written mid-QAT in such a fit holds the compacted shapes, its optimizer the compacted moments, while a
resumed fit builds the model at its full widths. QAT's state then carries what the resumed fit needs to be compacted
the same way before the checkpoint is loaded (:mod:`lightning_compress.integration.compacted_resume`); it is read
back by :func:`parse_snapshot`, as untrusted input. A checkpoint with compacted shapes and no such record (written
by an older version) is refused by :func:`check_not_compacted`, before any tensor is copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.io import UntrustedFileError
from lightning_compress.structure.shape_rules import parse_record


def follow_parameters(
    optimizers: Iterable[torch.optim.Optimizer], before: Mapping[str, nn.Parameter], model: nn.Module
) -> list[str]:
    """Replace, in every param group of ``optimizers``, each parameter of ``before`` (name -> parameter, taken
    before compaction) by the parameter of ``model`` now under that name, dropping its optimizer state, and drop
    the parameters no longer in ``model``. Returns the names of the parameters replaced or dropped."""
    after = dict(model.named_parameters())
    changed = {id(old): after.get(name) for name, old in before.items() if after.get(name) is not old}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            params = [changed.get(id(p), p) for p in group["params"]]
            group["params"] = [p for p in params if p is not None]
        for param in [p for p in optimizer.state if id(p) in changed]:
            del optimizer.state[param]
    return sorted(name for name, old in before.items() if id(old) in changed)


def masks_after(masks: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The pruning keep-masks (by ``state_dict`` key) still shaped like their weight after compaction."""
    state = model.state_dict(keep_vars=True)
    return {key: mask for key, mask in masks.items() if key in state and state[key].shape == mask.shape}


def check_not_compacted(state: Mapping[str, Tensor], model: nn.Module, source: str) -> None:
    """Refuse ``state`` (a checkpoint's ``state_dict``, from ``source``) when some entry is smaller than ``model``'s
    along some axis: it was written after compaction (mid-QAT in a fit that compacted), which a model at its full
    widths cannot resume without the compaction record QAT's state carries (a checkpoint of an older version, or
    of a QAT with other settings, whose state is not this one's). Other mismatches are left to ``load_state_dict``'s
    own error."""
    own = model.state_dict()
    for key, value in state.items():
        mine = own.get(key)
        if not isinstance(value, Tensor) or mine is None or value.dim() != mine.dim() or value.shape == mine.shape:
            continue
        if all(a <= b for a, b in zip(value.shape, mine.shape)):
            raise ValueError(
                f"cannot resume from {source}: {key!r} is {tuple(value.shape)} there, {tuple(mine.shape)} in this "
                "model; the checkpoint was written after GradientStabilityPruning(compact=True) compacted the model "
                "(when QuantizationAwareTraining started), and it holds no record of that compaction in the state of "
                "this QuantizationAwareTraining (written by an older version, or by a QAT with other settings). "
                "Allowed: the same callbacks as the fit that wrote it, a checkpoint written before QAT started, or a "
                "new fit from the compacted float weights (model.compact.safetensors, `load_compacted`)")


def parse_snapshot(source: str, value: Any, field: str) -> dict[str, Any]:
    """The compaction snapshot of a mid-QAT checkpoint (``field`` of ``source``, both named in errors), checked:
    ``axes`` a compaction record (:func:`~lightning_compress.structure.shape_rules.parse_record`), ``masks`` boolean
    tensors by key, ``final`` two fractions in [0, 1], ``macs`` two non-negative integers or None, ``file`` a plain
    ``.safetensors`` file name, ``layers`` ``{name: [parameters, bytes, sparsity, note]}``. Returns it parsed."""
    where = f"{source}: {field}"
    if not isinstance(value, dict):
        raise UntrustedFileError(f"{where} must be a dict, got {type(value).__name__}")
    missing = sorted({"axes", "masks", "final", "macs", "file", "layers"} - set(value))
    if missing:
        raise UntrustedFileError(f"{where} lacks {missing}: not written by this package")
    masks, final, macs, file, layers = (value[k] for k in ("masks", "final", "macs", "file", "layers"))
    if not isinstance(masks, dict) or not all(isinstance(k, str) and isinstance(m, Tensor) and m.dtype == torch.bool
                                              for k, m in masks.items()):
        raise UntrustedFileError(f"{where}.masks must map state_dict keys to boolean tensors, got {masks!r:.100}")
    if not (isinstance(final, list) and len(final) == 2
            and all(isinstance(f, float | int) and 0 <= f <= 1 for f in final)):
        raise UntrustedFileError(f"{where}.final must be [sparsity, weight sparsity] in [0, 1], got {final!r:.100}")
    if not (isinstance(macs, list) and len(macs) == 2
            and all(m is None or (type(m) is int and m >= 0) for m in macs)):
        raise UntrustedFileError(f"{where}.macs must be [MACs before, after], integers >= 0 or None, got {macs!r:.100}")
    if not isinstance(file, str) or "/" in file or "\\" in file or file.startswith(".") or not file.endswith(
            ".safetensors"):
        raise UntrustedFileError(f"{where}.file must be a plain file name ending in .safetensors, got {file!r:.100}")
    if not isinstance(layers, dict) or not all(
        isinstance(name, str) and isinstance(row, list) and len(row) == 4 and type(row[0]) is int and row[0] >= 0
        and type(row[1]) is int and row[1] >= 0 and isinstance(row[2], float | int) and 0 <= row[2] <= 1
        and isinstance(row[3], str) for name, row in layers.items()
    ):
        raise UntrustedFileError(f"{where}.layers must map layer names to [parameters, fp32 bytes, sparsity in "
                                 f"[0, 1], note], got {layers!r:.100}")
    return {"axes": parse_record(source, value["axes"], f"{field}.axes"), "masks": dict(masks),
            "final": (float(final[0]), float(final[1])), "macs": list(macs), "file": file, "layers": dict(layers)}


def check_masks_fit(source: str, masks: Mapping[str, Tensor], state: Mapping[str, Any], field: str) -> None:
    """Every keep-mask of a snapshot shaped like the weight under its key in ``state`` (the checkpoint's
    ``state_dict``, whose shapes the model is then checked against)."""
    for key, mask in masks.items():
        weight = state.get(key)
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
        if shape != tuple(mask.shape):
            raise UntrustedFileError(f"{source}: {field}.masks[{key!r:.100}] is shaped {tuple(mask.shape)}, the "
                                     f"checkpoint's weight {shape}: not a mask of this model")
