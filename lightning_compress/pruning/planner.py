"""What the next pruning event removes: scores -> new keep-masks for a target sparsity (or the article's
thresholds), unstructured or by unit. No Lightning import.

Structured targets (``structured_target``):

``units``  ``target`` is the fraction of the prunable units removed (a coupled set counted once). A block (an
           attention head) is ranked by its score per unit (the mean of its rows' scores), so a head competes with
           single neurons on equal terms, and counts as the units it holds.
``macs``   ``target`` is the fraction of the analysed layers' multiply-accumulates removed (see
           :func:`lightning_compress.structure.macs.estimated_macs`). Blocks are ranked by their importance (the
           sum of their rows' scores) per MAC their removal saves (first order, at the current masks), and the
           number removed is chosen so the estimated MACs come closest to the target: a channel at 32x32
           resolution costs 16x one at 8x8, so it goes sooner. The ratio is ``score / MACs ** macs_exponent``,
           default 0.5 (``benchmarks/bench_resnet.py --only structured --width 16``, 50 % of the MACs, one seed,
           dense 97.87 %: 0.5 -> 14.3 M MACs, 1.33x, -0.40 points; 1.0 -> 14.3 M, 1.37x, -0.67).

Further settings (:class:`~lightning_compress.pruning.config.PruningConfig`, all off by default; same benchmark, units
target 50 %: 15.4 M MACs, 1.31x, -0.80 points):

``normalize``      ``mean`` / ``median``: each set's block scores divided by that statistic of its kept blocks
                   before the global ranking (:func:`normalised`), so each layer is ranked against itself. With
                   ``mean`` and ``min_keep=0.25``: 45 % of the units -> 6.7 M MACs, 2.62x, -1.07 points; 50 % ->
                   5.9 M, 2.46x, -1.47 (``min_keep=0``: 2.5x, -1.87; ``median`` 45 %: 2.4x, -2.13). It cuts the
                   stage-1 residual set of the ResNet (16 -> 4-6 channels), which the raw ranking keeps whole, and
                   with one thread oneDNN runs a 3x3 convolution at 28x28 with 16 channels at about half the MACs
                   per second of 15 or fewer, so that is where the latency goes. With a MACs target it is harmful:
                   block importance is the mean over a set's members while its cost sums their MACs, so residual
                   sets went to 1 channel (-2.93 points, 1.55x). (Earlier "collapses to chance" with it came from the
                   benchmark fine-tuning models left in eval mode, BatchNorm statistics frozen; the callback now
                   warns about that.)
``round_to``       each layer of single-unit blocks keeps a multiple of this many units (:func:`round_counts`). 8
                   did not change the latency; the channel count that matters on this CPU is not a multiple but a
                   step (16 at 28x28 runs at half the MACs per second of 15), so rounding up to a multiple of 8 can
                   land a layer on the slow side.
``min_keep``       the per-layer floor; 0.25 is what keeps the ``normalize`` arm above within 1.5 points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.pruning import criteria, selection
from lightning_compress.pruning.config import STRUCTURED_TARGETS, PruningConfig
from lightning_compress.pruning.masks import expand_unit_masks
from lightning_compress.pruning.statistics import GradientStatistics
from lightning_compress.pruning.structured import BlockLayout, family_blocks, family_mask, layout, unit_families
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
    *,
    structured_target: str = "units",
    layer_targets: Mapping[str, float] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """New (parameter masks, unit masks), on the CPU. ``target`` None prunes by the config's thresholds. Masks only
    shrink: what ``masks`` / ``unit_masks`` already prune stays pruned. ``layer_targets`` (layer name -> fraction,
    unstructured only): each layer reaches its own sparsity (a budget plan's), ``target`` is then not read."""
    if structured_target not in STRUCTURED_TARGETS:
        raise ValueError(f"`structured_target` must be one of {list(STRUCTURED_TARGETS)}, got {structured_target!r}")
    names = layers.names
    weights = [w.detach() for w in layers.weights()]
    if layer_targets is not None and (config.structured or set(layer_targets) != set(names)):
        raise ValueError(f"`layer_targets` sets one sparsity per tracked layer {names} of unstructured pruning, got "
                         f"{sorted(layer_targets)} with structured={config.structured}")
    if not config.structured:
        scores = criteria.weight_scores(config.criterion, weights, stats)
        current = [
            masks.get(layers.param_name(n), torch.ones_like(w, dtype=torch.bool)).to(w.device)
            for n, w in zip(names, weights)
        ]
        if target is None:
            flags = _thresholds(config, stats)
            keep = selection.threshold_masks(flags, current, scores, config.min_keep)
        else:
            by_layer = None if layer_targets is None else [layer_targets[n] for n in names]
            keep = selection.keep_masks(scores, current, target, scope=config.scope, min_keep=config.min_keep,
                                        layer_sparsity=by_layer)
        return {layers.param_name(n): k.cpu() for n, k in zip(names, keep)}, {}

    families = unit_families(names, groups)
    if not families:
        reasons = {n: g.reason for n, g in (groups or {}).items() if n in layers.modules}
        raise RuntimeError(f"structured pruning: no selected layer can lose units safely: {reasons}")
    rows = layers.num_units()
    layouts = {n: layout(n, groups, rows[n]) for family in families for n in family}
    by_name = dict(zip(names, criteria.unit_scores(config.criterion, layers.weights(), stats)))
    scores = [family_blocks(family, by_name, layouts) for family in families]
    current = [layouts[f[0]].to_blocks(family_mask(f, unit_masks, rows[f[0]]), "any") for f in families]
    if target is None:
        flags_by_name = dict(zip(names, _thresholds(config, stats)))  # a block goes when every row of every member
        flagged = [torch.stack([layouts[n].to_blocks(flags_by_name[n].cpu(), "all") for n in f]).all(0)
                   for f in families]
        keep = selection.threshold_masks(flagged, current, scores, config.min_keep)
    else:
        if config.normalize != "none":
            scores = [normalised(s, k, config.normalize) for s, k in zip(scores, current)]
        if structured_target == "units" and all(lay == BlockLayout(lay.rows) for lay in layouts.values()):
            keep = selection.keep_masks(scores, current, target, scope=config.scope, min_keep=config.min_keep)
        else:
            keep = _weighted_keep(families, layouts, scores, current, target, config, groups, structured_target)
        if config.round_to > 1:
            keep = _rounded(keep, current, scores, families, layouts, config, groups, structured_target)
    new_units = {n: layouts[n].to_rows(k.cpu()) for family, k in zip(families, keep) for n in family}
    return expand_masks(model, new_units, groups), new_units


def normalised(score: Tensor, keep: Tensor, how: str) -> Tensor:
    """A coupled set's block scores divided by the ``mean`` / ``median`` score of the blocks it still keeps, so
    that a global ranking compares each block with its own layer rather than layers with each other (gradient
    statistics differ in scale from layer to layer by orders of magnitude)."""
    s = torch.nan_to_num(score.float(), nan=0.0)
    kept = s[keep.to(s.device)]
    if kept.numel() == 0:
        return s
    ref = float(kept.median() if how == "median" else kept.mean())
    return s / ref if math.isfinite(ref) and ref > 0 else s


def round_counts(
    counts: list[int], available: list[int], floors: list[int], costs: list[float], multiple: int
) -> list[int]:
    """Kept counts rounded to multiples of ``multiple`` while the total cost removed stays close to what ``counts``
    remove: every count first goes down to a multiple (never below one multiple, the floor rounded up, nor above
    ``available``, which caps it), then counts go back up one multiple at a time, largest remainder first, while
    that brings the total cost nearer to the original; what counts forced up leave unremoved is taken from the
    others, a multiple at a time, while that brings it nearer. So many small per-layer steps (a gradual schedule)
    still remove whole multiples somewhere instead of all rounding back up."""
    out = [min(a, max(multiple, (n // multiple) * multiple, -(-f // multiple) * multiple))
           for n, a, f in zip(counts, available, floors)]
    surplus = sum((n - o) * c for n, o, c in zip(counts, out, costs))  # cost removed beyond the request
    order = sorted(range(len(counts)), key=lambda j: (-(counts[j] - out[j]) / multiple, j))
    for i in order:
        extra = (min(available[i], out[i] + multiple) - out[i]) * costs[i]
        if extra > 0 and surplus >= extra / 2:
            out[i] += min(available[i], out[i] + multiple) - out[i]
            surplus -= extra
    for i in order:  # counts forced up (one multiple at least) leave less removed than asked: take it elsewhere
        lowest = max(multiple, -(-floors[i] // multiple) * multiple)
        while surplus < 0 and out[i] - multiple >= lowest and -surplus >= multiple * costs[i] / 2:
            out[i] -= multiple
            surplus += multiple * costs[i]
    return out


def _rounded(
    keep: list[Tensor],
    current: list[Tensor],
    scores: list[Tensor],
    families: list[list[str]],
    layouts: Mapping[str, BlockLayout],
    config: PruningConfig,
    groups: Mapping[str, Any] | None,
    structured_target: str,
) -> list[Tensor]:
    """``keep`` with each family of single-unit blocks (a channel, a neuron; not heads) keeping a multiple of
    ``config.round_to`` units: its best-scored ones among those ``current`` keeps (see :func:`round_counts`; the
    cost of a unit is one unit, or the MACs it saves for a MACs target). CPU convolution kernels (oneDNN) run
    channel counts that are multiples of 8 / 16 markedly faster; Torch-Pruning's ``round_to`` does the same."""
    eligible = [i for i, f in enumerate(families) if layouts[f[0]].block == 1 and layouts[f[0]].parts == 1]
    if not eligible:
        return keep
    if structured_target == "macs" and groups:
        from lightning_compress.structure.macs import block_macs

        unit_masks = {n: layouts[n].to_rows(k) for f, k in zip(families, current) for n in f}
        all_costs = block_macs(groups, families, unit_masks)
    else:
        all_costs = [1.0] * len(families)
    counts = round_counts(
        [int(keep[i].sum()) for i in eligible], [int(current[i].sum()) for i in eligible],
        [selection.floor_count(keep[i].numel(), config.min_keep) for i in eligible],
        [all_costs[i] for i in eligible], config.round_to,
    )
    out = list(keep)
    for i, count in zip(eligible, counts):
        s = torch.nan_to_num(scores[i].float(), nan=0.0).masked_fill(~current[i].to(scores[i].device), float("-inf"))
        out[i] = selection.top_k(s, count).to(keep[i].device)
    return out


def _thresholds(config: PruningConfig, stats: GradientStatistics | None) -> list[Tensor]:
    if stats is None or config.mean_threshold is None or config.std_threshold is None:
        raise ValueError("pruning by thresholds needs gradient statistics and both thresholds")
    return criteria.below_thresholds(stats, config.structured, config.mean_threshold, config.std_threshold)


def _weighted_keep(
    families: list[list[str]],
    layouts: Mapping[str, BlockLayout],
    scores: list[Tensor],
    current: list[Tensor],
    target: float,
    config: PruningConfig,
    groups: Mapping[str, Any] | None,
    structured_target: str,
) -> list[Tensor]:
    """Remove blocks in ascending order of score per cost (units, or MACs saved) until the fraction removed is
    closest to ``target`` (per family with ``scope="layer"``). Each family keeps its ``min_keep`` floor of blocks."""
    if structured_target == "macs":
        if not groups or any(f[0] not in groups for f in families):
            raise ValueError("`structured_target`='macs' needs the dependency analysis (an example input) for every "
                             "selected layer")
        from lightning_compress.structure.macs import block_macs, estimated_macs

        rows_of = {n: lay.to_rows for n, lay in layouts.items()}
        costs = block_macs(groups, families, {n: rows_of[n](k) for f, k in zip(families, current) for n in f})
        dense = estimated_macs(groups, {})

        def removed(keeps: list[Tensor]) -> float:
            unit_masks = {n: rows_of[n](k) for f, k in zip(families, keeps) for n in f}
            return 1.0 - estimated_macs(groups, unit_masks) / max(dense, 1e-12)
    else:
        costs = [float(layouts[f[0]].rows_per_block) for f in families]
        total = sum(layouts[f[0]].rows for f in families)

        def removed(keeps: list[Tensor]) -> float:
            return 1.0 - sum(int(k.sum()) * c for k, c in zip(keeps, costs)) / max(total, 1)

    candidates = []  # (score per cost, family, block) of the blocks that may go
    for i, (score, keep) in enumerate(zip(scores, current)):
        floor = min(selection.floor_count(keep.numel(), config.min_keep), int(keep.sum()))
        s = torch.nan_to_num(score.float(), nan=0.0).masked_fill(~keep, float("-inf"))
        protected = selection.top_k(s, floor)
        if structured_target == "units":  # a block's score is already per unit (the mean of its rows)
            ratio = s
        else:  # the block's whole importance (its rows' sum) per MAC its removal saves
            rows = layouts[families[i][0]].rows_per_block
            cost = costs[i] ** config.macs_exponent
            ratio = s * rows / cost if costs[i] > 0 else torch.full_like(s, float("inf"))
        candidates += [(float(ratio[b]), i, b) for b in range(keep.numel()) if bool(keep[b]) and not protected[b]]
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))

    def after(chosen: list[tuple[float, int, int]]) -> list[Tensor]:
        keeps = [k.clone() for k in current]
        for _, i, b in chosen:
            keeps[i][b] = False
        return keeps

    if config.scope == "layer":
        keeps = []
        for i in range(len(families)):
            mine = [c for c in candidates if c[1] == i]
            n_blocks = current[i].numel()
            goal = target * n_blocks - (n_blocks - int(current[i].sum()))
            keeps.append(after(mine[: max(0, min(len(mine), int(round(goal))))])[i])
        return keeps
    if removed(current) >= target:
        return current
    low, high = 0, len(candidates)  # smallest prefix reaching the target (removed() grows with the prefix)
    while low < high:
        middle = (low + high) // 2
        if removed(after(candidates[:middle])) >= target - 1e-12:
            high = middle
        else:
            low = middle + 1
    if low > 0 and math.fabs(removed(after(candidates[: low - 1])) - target) < math.fabs(
        removed(after(candidates[:low])) - target
    ):
        low -= 1
    return after(candidates[:low])


def expand_masks(
    model: nn.Module, unit_keep: Mapping[str, Tensor], groups: Mapping[str, Any] | None
) -> dict[str, Tensor]:
    """Parameter keep-masks for unit masks: :func:`~lightning_compress.pruning.masks.expand_unit_masks` for Linear /
    Conv producers; for an attention module its ``in_proj_weight`` rows and ``in_proj_bias``, and the columns of
    ``out_proj`` (its consumer) that the kept heads feed."""
    from lightning_compress.structure.attention import ATTENTION_TYPES

    modules = dict(model.named_modules())
    attention = {n: k for n, k in unit_keep.items() if isinstance(modules[n], ATTENTION_TYPES)}
    out = expand_unit_masks(model, {n: k for n, k in unit_keep.items() if n not in attention}, groups)
    for name, keep in attention.items():
        module, keep = modules[name], keep.bool()
        out[f"{name}.in_proj_weight"] = keep.view(-1, 1).expand_as(module.in_proj_weight).clone()
        if module.in_proj_bias is not None:
            out[f"{name}.in_proj_bias"] = keep.clone()
        group = (groups or {}).get(name)
        if group is not None and group.prunable:
            units = keep.view(group.parts, -1).any(0)
            for consumer, repeat, offset in group.consumers:
                weight = modules[consumer].weight
                cols = torch.ones(weight.shape[1], dtype=torch.bool)
                cols[offset : offset + units.numel() * repeat] = units.repeat_interleave(repeat)
                column_mask = cols.view(1, -1).expand_as(weight).clone()
                key = f"{consumer}.weight"
                out[key] = out[key] & column_mask if key in out else column_mask
    return {n: m.cpu() for n, m in out.items()}
