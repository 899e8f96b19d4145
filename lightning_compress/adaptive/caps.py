"""The budget for one model: its caps in bytes and MACs per example, what the rest of the model costs, and the
refusal of a budget below the model's floor, made before any work (``compress()``) or any training step
(``AdaptiveCompression.setup``). No Lightning import."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.costs import dense_macs, fixed_bytes, model_macs, positions
from lightning_compress.adaptive.plan import cheapest_bytes, floor_bytes, floor_macs
from lightning_compress.adaptive.units import LAYERS, kept_counts
from lightning_compress.core.accounting import state_bytes
from lightning_compress.pruning.structured import unit_families
from lightning_compress.quantization.coverage import QUANT_MODULE_TYPES, layer_weight, select_layers, weight_key
from lightning_compress.structure.compaction import compact
from lightning_compress.structure.dependency import find_unit_groups


@dataclass
class Caps:
    """The budget for one model: caps (None: no cap), what the rest of the model costs, where each weight is
    applied per example (0 everywhere when no batch was given: only a MACs cap reads it)."""

    size_cap: int | None
    macs_cap: int | None
    fixed_bytes: int
    other_macs: int
    where: dict[str, float]
    cheapest: int | None = None  # tensor bytes of the cheapest plan on the weights at the time (``estimate=True``)


def budget_caps(model: nn.Module, budget: Budget, batch: Any = None,
                forward: Callable[[nn.Module, Any], Any] | None = None, estimate: bool = False,
                prunable: Collection[str] | None = None, units_shape: Sequence[int] = ()) -> Caps:
    """``budget`` for ``model`` (a MACs budget needs ``batch`` and ``forward`` to count where each weight is
    applied). Raises ``ValueError`` naming ``budget`` when the arithmetic shows it cannot be met. ``estimate``: with a
    size cap, also price the cheapest plan on the weights as they are
    (:func:`~.plan.cheapest_bytes`, for a fit's early warning). ``prunable``: the layers a plan may prune (None:
    every layer; a fit prunes only the layers it tracks), the others priced dense in the MACs floor (a plan's MACs
    count its weights' nonzero entries before rounding) and in the cheapest plan. ``units_shape`` (a latency budget's
    input shape; empty: none): the fit removes whole units only and nothing after them lowers MACs (int8, widths),
    so the MACs floor is :func:`units_floor_macs`'."""
    layers, _ = select_layers(model, QUANT_MODULE_TYPES)
    weights = {name: layer_weight(name, module) for name, module in layers.items()}
    fixed = fixed_bytes(model, {name: weight_key(name, module) for name, module in layers.items()})
    size_cap = budget.size_bytes(sum(state_bytes(model).values()))
    if budget.macs is not None and (batch is None or forward is None):
        raise ValueError(f"`budget` macs={budget.macs!r} counts MACs per example, which needs an example batch "
                         "(the first training batch, or the model's `example_input_array`)")
    where = positions(model, layers, batch, forward) if batch is not None and forward is not None else \
        {name: 0.0 for name in layers}
    other, macs_cap = 0, None
    if budget.macs is not None and batch is not None and forward is not None:
        other = max(0, model_macs(model, batch, forward) - dense_macs(weights, where))
        macs_cap = budget.macs_count(other + dense_macs(weights, where))
    if size_cap is not None and size_cap < (floor := floor_bytes(weights, fixed)):
        raise ValueError(f"`budget` size={budget.size!r} ({size_cap} bytes) is below the floor of this model: "
                         f"{floor} bytes of tensor data with every weight pruned, only one scale per row stored "
                         "(the header comes on top); allowed: a larger size")
    if macs_cap is not None and macs_cap < (floor := floor_macs(weights, where, other, prunable)):
        raise ValueError(f"`budget` macs={budget.macs!r} ({macs_cap} MACs per example) is below the floor of this "
                         f"model: {floor} MACs with every layer at its largest sparsity"
                         + ("" if prunable is None else " (the layers not pruned dense)")
                         + "; allowed: a larger count")
    if macs_cap is not None and units_shape and forward is not None and macs_cap < (floor := units_floor_macs(
            model, torch.randn(tuple(units_shape), generator=torch.Generator().manual_seed(0)),
            list(layers) if prunable is None else prunable, batch, forward)):
        raise ValueError(f"`budget` macs={budget.macs!r} ({macs_cap} MACs per example) is below what whole units "
                         f"can reach with `budget` latency={budget.latency!r}: {floor} MACs with every family of units "
                         "at its fewest kept (a latency plan removes whole units; int8 and widths after them lower no "
                         "MAC); allowed: a larger count")
    cheapest = cheapest_bytes(weights, fixed, prunable) if estimate and size_cap is not None else None
    return Caps(size_cap, macs_cap, fixed, other, where, cheapest)


def units_floor_macs(model: nn.Module, example: Any, prunable: Collection[str], batch: Any,
                     forward: Callable[[nn.Module, Any], Any]) -> int:
    """MACs per example of a copy of ``model`` with every family of whole units a fit may remove (those of
    ``prunable`` the latency planner offers: plain units of Linear / Conv producers) at its fewest kept count,
    compacted and counted on ``batch``: exact from the shapes, whichever units go."""
    groups = find_unit_groups(model, example)
    modules = dict(model.named_modules())
    masks = {}
    for family in unit_families(prunable, groups):
        if all(groups[n].parts == 1 and groups[n].block == 1 and isinstance(modules[n], LAYERS) for n in family):
            units = groups[family[0]].num_units
            mask = torch.arange(units) < kept_counts(units)[-1]
            masks.update({name: mask for name in family})
    return model_macs(compact(model, masks, example).model if masks else model, batch, forward)
