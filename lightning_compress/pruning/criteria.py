"""Importance scores from gradient statistics and weights. Pure PyTorch: no Lightning import.

Higher score = more important = kept longer. Four criteria, selectable by name:

``stability``           the source article's rule: a gradient whose mean stays near zero and whose spread is small
                        marks an unimportant weight. Score ``|mean(g)| + std(g)``. Blind to the weight's size,
                        which is why it collapses at high sparsity (it happily removes large, settled weights).
``weighted_stability``  ``|w| * (|mean(g)| + std(g)``): the article's signal scaled by how much the weight
                        contributes. The default (see README for the measurement).
``magnitude``           ``|w|``; needs no gradient statistics.
``taylor``              second-order Taylor / Fisher form of Molchanov et al. (2019): ``|w| * sqrt(E[g^2])`` per
                        weight (the square root of the accumulated ``(w*g)^2`` with the current weight), and
                        ``sqrt(E[(sum_j w_ij g_ij)^2])`` per unit.

Per-unit scores use the per-unit statistics of :mod:`lightning_compress.pruning.statistics` (RMS of the unit's gradient,
and the unit's Taylor term); unit magnitude is the RMS of the unit's weights, so units of layers with different
fan-in compare fairly in a global ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_compress.pruning.statistics import GradientStatistics, unit_view

CRITERIA = ("weighted_stability", "stability", "magnitude", "taylor")
GRADIENT_CRITERIA = frozenset({"weighted_stability", "stability", "taylor"})


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"`criterion` must be one of {list(CRITERIA)}, got {criterion!r}")


def _broadcast_units(per_unit: Tensor, like: Tensor) -> Tensor:
    return per_unit.to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1))).expand_as(like)


def weight_scores(criterion: str, weights: Sequence[Tensor], stats: GradientStatistics | None) -> list[Tensor]:
    """One score per weight element. Uses per-weight statistics when tracked, else the cheap per-unit ones
    (every weight of a unit shares the unit's gradient factor)."""
    _check_criterion(criterion)
    abs_w = [w.detach().abs().float() for w in weights]
    if criterion == "magnitude":
        return abs_w
    if stats is None:
        raise ValueError(f"criterion {criterion!r} needs gradient statistics")
    if stats.per_weight:
        mean_abs = [m.abs() for m in stats.weight_mean()]
        std = stats.weight_std()
        if criterion == "stability":
            return [m + s for m, s in zip(mean_abs, std)]
        if criterion == "weighted_stability":
            return [a * (m + s) for a, m, s in zip(abs_w, mean_abs, std)]
        if criterion == "taylor":
            return [a * (m.square() + s.square()).sqrt() for a, m, s in zip(abs_w, mean_abs, std)]
    else:
        factor = unit_gradient_factor(criterion, stats)
        if criterion == "stability":
            return [_broadcast_units(f, a) for f, a in zip(factor, abs_w)]
        return [a * _broadcast_units(f, a) for f, a in zip(factor, abs_w)]
    raise ValueError(f"`criterion` must be one of {list(CRITERIA)}, got {criterion!r}")


def unit_gradient_factor(criterion: str, stats: GradientStatistics) -> list[Tensor]:
    """The gradient part of a unit's score: ``mean + std`` of its gradient RMS (stability criteria) or the
    square root of its second gradient moment (taylor, from the RMS signal)."""
    mean, std = stats.unit_rms_mean(), stats.unit_rms_std()
    if criterion == "taylor":
        return [(m.square() + s.square()).sqrt() for m, s in zip(mean, std)]
    return [m + s for m, s in zip(mean, std)]


def unit_scores(criterion: str, weights: Sequence[Tensor], stats: GradientStatistics | None) -> list[Tensor]:
    """One score per output unit (row / output channel) of each weight."""
    _check_criterion(criterion)
    rms_w = [unit_view(w.detach().float()).square().mean(dim=1).sqrt() for w in weights]
    if criterion == "magnitude":
        return rms_w
    if stats is None:
        raise ValueError(f"criterion {criterion!r} needs gradient statistics")
    if criterion == "taylor":
        return [t.sqrt().float().to(w.device) for t, w in zip(stats.unit_taylor_second_moment(), weights)]
    factor = [f.float().to(w.device) for f, w in zip(unit_gradient_factor(criterion, stats), weights)]
    if criterion == "stability":
        return factor
    if criterion == "weighted_stability":
        return [r * f for r, f in zip(rms_w, factor)]
    raise ValueError(f"`criterion` must be one of {list(CRITERIA)}, got {criterion!r}")


def below_thresholds(
    stats: GradientStatistics, structured: bool, mean_threshold: float, std_threshold: float
) -> list[Tensor]:
    """The article's rule as a hard test: True where ``|mean(g)| < mean_threshold`` and ``std(g) < std_threshold``
    (per weight, or on the unit's gradient RMS when ``structured``)."""
    if structured or not stats.per_weight:
        mean, std = stats.unit_rms_mean(), stats.unit_rms_std()
    else:
        mean, std = stats.weight_mean(), stats.weight_std()
    return [(m.abs() < mean_threshold) & (s < std_threshold) for m, s in zip(mean, std)]
