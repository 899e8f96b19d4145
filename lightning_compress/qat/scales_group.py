"""The scales' param group in the fit's optimizer while QAT runs: added when QAT starts, moved into the callback's
checkpoint state, restored on resume, removed at the end. No Lightning.

A fresh optimizer (a resumed fit builds one before QAT starts again) has no such group, so Lightning could not
restore it from ``optimizer_states``: the group's settings and its parameters' state travel apart, in the order of
the scales, and are put back when QAT starts again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer


def add(optimizer: Optimizer, scales: Sequence[Tensor], lr: float | None, saved: dict[str, Any]) -> dict[str, Any]:
    """One more param group holding ``scales``, with the first group's settings (e.g. ``OneCycleLR``'s keys),
    learning rate ``lr`` (None: the first group's) and no weight decay; ``saved`` (what :func:`split` kept) restores
    the group's settings and each scale's state. Returns the group."""
    first = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    group = {**first, "lr": lr if lr is not None else first["lr"], "weight_decay": 0.0}
    optimizer.add_param_group({**group, **saved.get("group", {}), "params": list(scales)})
    for scale, state in zip(scales, saved.get("state", [])):
        if state:
            optimizer.state[scale] = {k: v.to(scale.device) if isinstance(v, Tensor) else v for k, v in state.items()}
    added: dict[str, Any] = optimizer.param_groups[-1]
    return added


def remove(optimizer: Optimizer, group: dict[str, Any]) -> None:
    """``group`` out of ``optimizer``, its parameters' state with it."""
    # by identity: list.remove compares dicts, i.e. their params lists, tensor by tensor
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g is not group]
    for scale in group["params"]:
        optimizer.state.pop(scale, None)


def split(optimizer: Optimizer, group: dict[str, Any], states: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Take ``group`` out of a checkpoint's first ``optimizer_states`` entry: its settings and its parameters'
    states, in order (None when the checkpoint holds no optimizer state)."""
    if not states:
        return None
    index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
    saved = states[0]
    settings = saved["param_groups"].pop(index)
    ids = settings.pop("params")
    return {"group": settings, "state": [saved["state"].pop(i, {}) for i in ids]}


def linear_scales_resumed(pending: dict[str, Any], weights: int) -> tuple[dict[str, Any], bool]:
    """The saved optimizer state of the scales' param group, and whether moments were dropped. A checkpoint written
    before the weights' scales were learned in log space holds the scales themselves (no ``log_gains``): they resume
    exactly as base scales with a gain of 0, but their optimizer moments were a linear scale's, so the first
    ``weights`` are dropped (they restart)."""
    saved = dict(pending.get("optimizer") or {})
    if "scales" in pending and "log_gains" not in pending and saved.get("state"):
        saved["state"] = [{} for _ in saved["state"][:weights]] + list(saved["state"][weights:])
        return saved, True
    return saved, False
