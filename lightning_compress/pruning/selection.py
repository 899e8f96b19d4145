"""Choosing what to prune from scores: global / per-layer top-k with per-layer floors, and the article's
thresholds. Pure PyTorch: no Lightning import. Masks are boolean "keep" tensors that only ever shrink."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def floor_count(numel: int, min_keep: float) -> int:
    """Entries a layer keeps at least: ``ceil(min_keep * numel)``, never fewer than one."""
    return max(1, math.ceil(min_keep * numel))


def keep_masks(
    scores: Sequence[Tensor],
    current: Sequence[Tensor],
    sparsity: float,
    *,
    scope: str = "global",
    min_keep: float = 0.0,
    layer_sparsity: Sequence[float] | None = None,
) -> list[Tensor]:
    """New keep-masks reaching ``sparsity`` (fraction of all entries pruned) by dropping the lowest scores.

    ``current`` masks are respected (pruned stays pruned; if they are already sparser than asked, nothing more
    is pruned). ``scope="global"`` ranks all entries together, ``"layer"`` ranks each tensor on its own. Each
    tensor keeps at least :func:`floor_count` entries (its highest-scored ones), so no layer is pruned away.
    Ties are broken by position (stable sort), so the result is deterministic. ``layer_sparsity`` (one fraction per
    tensor) gives each tensor its own target instead, ranked within the tensor (``sparsity`` and ``scope`` are then
    not read): a budget plan decides how much each layer loses, the scores decide which of its entries.
    """
    if layer_sparsity is not None and len(layer_sparsity) != len(scores):
        raise ValueError(f"`layer_sparsity` needs one target per tensor ({len(scores)}), got {len(layer_sparsity)}")
    ranked = []
    for score, keep in zip(scores, current):
        s = torch.nan_to_num(score.detach().float().flatten(), nan=0.0, posinf=3e38, neginf=-3e38)
        s = s.clamp(-3e38, 3e38).masked_fill(~keep.flatten().to(s.device), float("-inf"))
        floor = min(floor_count(s.numel(), min_keep), int(keep.sum()))
        if floor > 0:
            s[top_k(s, floor)] = float("inf")
        ranked.append(s)
    if scope == "layer" or layer_sparsity is not None:
        targets = layer_sparsity if layer_sparsity is not None else [sparsity] * len(ranked)
        return [
            _keep_top(s, _keep_count(s.numel(), t, int(k.sum()))).view_as(k).to(k.device)
            for s, k, t in zip(ranked, current, targets)
        ]
    if scope != "global":
        raise ValueError(f"`scope` must be one of ['global', 'layer'], got {scope!r}")
    flat = torch.cat([s.to(ranked[0].device) for s in ranked])
    kept_now = sum(int(k.sum()) for k in current)
    keep_flat = _keep_top(flat, _keep_count(flat.numel(), sparsity, kept_now))
    return [m.view_as(k).to(k.device) for m, k in zip(torch.split(keep_flat, [s.numel() for s in ranked]), current)]


def _keep_count(numel: int, sparsity: float, kept_now: int) -> int:
    return min(kept_now, numel - int(round(sparsity * numel)))


def _keep_top(flat_scores: Tensor, n_keep: int) -> Tensor:
    return top_k(flat_scores, max(n_keep, int(torch.isinf(flat_scores).logical_and(flat_scores > 0).sum())))


def top_k(flat_scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` highest scores, ties broken by position (the lowest index first): the first ``k`` of
    a stable descending sort, found in linear time (``kthvalue`` for the threshold, then the tied entries in order)."""
    n = flat_scores.numel()
    if k >= n:
        return torch.ones_like(flat_scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(flat_scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat_scores, n - k + 1).values  # the k-th largest
    keep = flat_scores > threshold
    ties = (flat_scores == threshold).nonzero().flatten()[: k - int(keep.sum())]
    keep[ties] = True
    return keep


def threshold_masks(
    prune: Sequence[Tensor], current: Sequence[Tensor], scores: Sequence[Tensor], min_keep: float = 0.0
) -> list[Tensor]:
    """Keep-masks that drop every entry flagged in ``prune``, except each tensor's floor of best-scored entries."""
    out = []
    for flag, keep, score in zip(prune, current, scores):
        new_keep = keep & ~flag.to(keep.device).view_as(keep)
        floor = min(floor_count(keep.numel(), min_keep), int(keep.sum()))
        if int(new_keep.sum()) < floor:
            s = score.detach().float().flatten().masked_fill(~keep.flatten(), float("-inf"))
            new_keep = (new_keep.flatten() | top_k(s, floor)).view_as(keep)
        out.append(new_keep)
    return out


def sparsity_of(masks: Iterable[Tensor]) -> float:
    masks = list(masks)
    total = sum(m.numel() for m in masks)
    return 1.0 - sum(int(m.sum()) for m in masks) / max(total, 1)
