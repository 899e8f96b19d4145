"""Quantization-aware training on a model that structured pruning compacts in the same fit. No Lightning.

Compaction removes the pruned units: the weights get new, smaller shapes, as new ``nn.Parameter`` objects. QAT's
codes and scales are shaped like the weights they quantize, so the model is compacted when QAT starts (pruning is
over by then), and the fake quantizers are put on the compacted layers: the codes QAT trains are the delivered
model's. The fit's optimizer still holds the old parameters: :func:`follow_parameters` points it at the new ones
(their moments restart: the old ones have the old shapes); :func:`masks_after` keeps the pruning masks of the
layers compaction left their shape (units it could not remove stay zero through QAT).

A checkpoint written mid-QAT in such a fit holds the compacted shapes, its optimizer the compacted moments, while a
resumed fit builds the model at its full widths and compacts only when QAT starts: :func:`check_not_compacted`
refuses it (before any tensor is copied) with what to do instead. Resuming it is not supported yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


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
    widths cannot resume. Other mismatches are left to ``load_state_dict``'s own error."""
    own = model.state_dict()
    for key, value in state.items():
        mine = own.get(key)
        if not isinstance(value, Tensor) or mine is None or value.dim() != mine.dim() or value.shape == mine.shape:
            continue
        if all(a <= b for a, b in zip(value.shape, mine.shape)):
            raise ValueError(
                f"cannot resume from {source}: {key!r} is {tuple(value.shape)} there, {tuple(mine.shape)} in this "
                "model; the checkpoint was written after GradientStabilityPruning(compact=True) compacted the model "
                "(when QuantizationAwareTraining started), and resuming a compacted fit mid-QAT is not supported. "
                "Allowed: resume from a checkpoint written before QAT started, or start a new fit from the "
                "compacted float weights (model.compact.safetensors, `load_compacted`)")
