"""What the next pruning event removes: scores -> new keep-masks for a target sparsity (or the article's
thresholds), unstructured or by unit. No Lightning import."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.pruning import criteria, selection
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.masks import expand_unit_masks
from lightning_compress.pruning.statistics import GradientStatistics
from lightning_compress.pruning.structured import family_mask, unit_families
from lightning_compress.pruning.tracked import TrackedLayers


def plan_masks(
    config: PruningConfig,
    model: nn.Module,
    layers: TrackedLayers,
    stats: GradientStatistics | None,
    masks: Mapping[str, Tensor],
    unit_masks: Mapping[str, Tensor],
    groups: Mapping[str, Any] | None,
    target: float | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """New (parameter masks, unit masks), on the CPU. ``target`` None prunes by the config's thresholds. Masks only
    shrink: what ``masks`` / ``unit_masks`` already prune stays pruned."""
    names = layers.names
    weights = [w.detach() for w in layers.weights()]
    if config.structured:
        families = unit_families(names, groups)
        if not families:
            reasons = {n: g.reason for n, g in (groups or {}).items() if n in layers.modules}
            raise RuntimeError(f"structured pruning: no selected layer can lose units safely: {reasons}")
        by_name = dict(zip(names, criteria.unit_scores(config.criterion, layers.weights(), stats)))
        # a coupled set shares its units: one score (the members' mean), one mask for all of them
        scores = [torch.stack([by_name[n].float() for n in family]).mean(0) for family in families]
        units = layers.num_units()
        current = [family_mask(f, unit_masks, units[f[0]], by_name[f[0]].device) for f in families]
    else:
        scores = criteria.weight_scores(config.criterion, weights, stats)
        current = [
            masks.get(f"{n}.weight", torch.ones_like(w, dtype=torch.bool)).to(w.device) for n, w in zip(names, weights)
        ]
    if target is None:  # the article's thresholds
        if stats is None or config.mean_threshold is None or config.std_threshold is None:
            raise ValueError("pruning by thresholds needs gradient statistics and both thresholds")
        flags = criteria.below_thresholds(stats, config.structured, config.mean_threshold, config.std_threshold)
        flags_by_name = dict(zip(names, flags))
        if config.structured:  # a shared unit goes when every member flags it
            flagged = [torch.stack([flags_by_name[n] for n in family]).all(0) for family in families]
        else:
            flagged = [flags_by_name[n] for n in names]
        keep = selection.threshold_masks(flagged, current, scores, config.min_keep)
    else:
        keep = selection.keep_masks(scores, current, target, scope=config.scope, min_keep=config.min_keep)
    if config.structured:
        new_units = {n: k.cpu() for family, k in zip(families, keep) for n in family}
        return {n: m.cpu() for n, m in expand_unit_masks(model, new_units, groups).items()}, new_units
    return {f"{n}.weight": k.cpu() for n, k in zip(names, keep)}, {}

