"""Structured pruning's units: which selected layers can lose output units, and which of them share their units
(coupled sets: producers a residual add sums must drop the same channels). No Lightning import."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


def unit_families(selected: Iterable[str], groups: Mapping[str, Any] | None) -> list[list[str]]:
    """The selected layers that can lose units, as sets that share their units: a layer alone, or the producers a
    residual add couples (those of them that are selected). ``groups`` are the dependency analysis's
    ``UnitGroup`` s by layer name; a layer the analysis has not seen (or before it ran) stands alone."""
    groups = groups or {}
    selected = list(selected)
    prunable = [n for n in selected if groups.get(n) is None or groups[n].prunable]
    families, seen = [], set()
    for name in prunable:
        if name in seen:
            continue
        coupled = groups[name].coupled if groups.get(name) is not None else []
        family = [name] + [c for c in coupled if c in prunable and c not in seen]
        seen.update(family)
        families.append(family)
    return families


def family_mask(family: list[str], unit_masks: Mapping[str, Tensor], num_units: int, device: Any = None) -> Tensor:
    """The units a family keeps: those every member keeps (all of them before the first event)."""
    keep = torch.ones(num_units, dtype=torch.bool)
    for name in family:
        if name in unit_masks:
            keep &= unit_masks[name].cpu()
    return keep.to(device) if device is not None else keep


def unit_sparsity(families: list[list[str]], unit_masks: Mapping[str, Tensor], num_units: Mapping[str, int]) -> float:
    """Fraction of the prunable units removed, a coupled set counted once."""
    total = sum(num_units[f[0]] for f in families)
    kept = sum(int(family_mask(f, unit_masks, num_units[f[0]]).sum()) for f in families)
    return 1.0 - kept / max(total, 1)
