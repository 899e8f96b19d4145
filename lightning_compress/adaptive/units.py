"""Structured candidates: how many units (output channels / neurons) each removable set keeps, which ones, and at
what predicted loss. No Lightning import.

A *family* is a prunable set of producers that share their units (:func:`~lightning_compress.structure.dependency.
find_unit_groups`: one Linear / Conv, or the convolutions a residual add couples), named by its first producer.
A unit's predicted loss increase is ``1/2 * sum(F * W^2)`` over its rows in the family's producers (the diagonal
Fisher of :mod:`.fisher`, summed per unit), what removing those rows costs to second order. Scoring the consumers'
input columns instead (zeroing a unit's output is zeroing them, BatchNorm shift included) was tried: on
``benchmarks/bench_adaptive_latency.py``'s CNN it kept worse units at two budgets (BatchNorm statistics refreshed in
both), so the producer rows are used. Units go lowest score first; a family's candidate scores add up its removed
units. Attention heads (``parts > 1``) are not offered: the latency table times Linear / Conv layers only.

Kept counts are the fractions :data:`KEEP` of a family's units, rounded to a multiple of :data:`ROUND_TO` where
the family has at least four times that many units (vector kernels run whole multiples of 8 lanes; the latency table
measures the counts as they are, so a count that runs slow is seen as slow).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_compress.core.modules import weight_of
from lightning_compress.structure.compaction import _families as families_of
from lightning_compress.structure.dependency import UnitGroup

KEEP = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)  # fractions of a family's units a candidate keeps
ROUND_TO = 8
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class UnitCandidate:
    """Keep ``kept`` of the family's ``units`` (the highest-scoring), at predicted loss increase ``score``."""

    family: str
    kept: int
    units: int
    score: float


def families(groups: Mapping[str, UnitGroup]) -> dict[str, list[str]]:
    """Each prunable family (name -> its producers) of plain units (no attention heads)."""
    return {f[0]: f for f in families_of(groups) if groups[f[0]].parts == 1 and groups[f[0]].block == 1}


def kept_counts(units: int) -> list[int]:
    """The distinct counts the :data:`KEEP` fractions give, largest first (rounded, see the module docstring)."""
    step = ROUND_TO if units >= 4 * ROUND_TO and units % ROUND_TO == 0 else 1
    counts = {max(step, round(fraction * units / step) * step) for fraction in KEEP}
    return sorted(counts, reverse=True)


def unit_scores(group: UnitGroup, members: list[str], modules: Mapping[str, nn.Module],
                fisher: Mapping[str, Tensor]) -> Tensor:
    """Per unit of the family, ``1/2 * sum(F * W^2)`` over its rows in every producer of the family."""
    scores = torch.zeros(group.num_units, dtype=torch.float64)
    for member in members:
        weight = weight_of(modules[member], member).detach().float()
        scores += (fisher[member] * weight.square()).reshape(group.num_units, -1).sum(1).double()
    return 0.5 * scores


def family_candidates(name: str, scores: Tensor) -> list[UnitCandidate]:
    """One candidate per :func:`kept_counts` entry: the lowest-scoring units removed, their scores summed."""
    ordered = torch.sort(scores, stable=True).values  # ties: the same on every run
    units = scores.numel()
    return [UnitCandidate(name, kept, units, float(ordered[: units - kept].sum())) for kept in kept_counts(units)]


def keep_mask(scores: Tensor, kept: int) -> Tensor:
    """Bool mask over the units: True for the ``kept`` highest-scoring (ties: the lower index stays)."""
    order = torch.argsort(-scores, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:kept]] = True
    return mask


def unit_masks(plan: Mapping[str, UnitCandidate], scores: Mapping[str, Tensor],
               members: Mapping[str, list[str]]) -> dict[str, Tensor]:
    """Keep-masks for :func:`~lightning_compress.structure.compaction.compact`: every producer of a family gets
    the family's mask (a coupled unit goes only when every producer drops it)."""
    masks = {}
    for name, candidate in plan.items():
        if candidate.kept == candidate.units:
            continue
        mask = keep_mask(scores[name], candidate.kept)
        for member in members[name]:
            masks[member] = mask.clone()
    return masks


def masked_copy(model: nn.Module, groups: Mapping[str, UnitGroup], masks: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``model`` with the removed units zeroed (producer rows and bias, BatchNorm weight and bias): what
    the compacted model must compute."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            drop = ~mask
            targets = [modules[name], *[modules[f] for f in groups[name].followers]]
            for module in targets:
                for attribute in ("weight", "bias"):
                    value = getattr(module, attribute, None)
                    if isinstance(value, Tensor):
                        value[drop] = 0
    return out
