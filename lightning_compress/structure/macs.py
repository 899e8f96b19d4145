"""What a forward pass costs in multiply-accumulates (MACs), measured and as estimated from unit masks. Pure PyTorch.

- :func:`count_macs` runs the model once on the example input under ``torch.utils.flop_counter.FlopCounterMode``
  (every matrix product and convolution at the ATen level, attention kernels included) and returns FLOPs / 2.
  Use it for "MACs before / after" (per example: :func:`macs_per_example`) in reports: it measures the model as
  it is.
- :func:`estimated_macs` predicts, without running anything, the MACs of the Linear / Conv / attention layers after
  the units that ``unit_masks`` drop were removed: each layer's MACs from the example pass (``UnitGroup.macs``)
  scaled by the fraction of its output units and of its input columns kept, plus the per-head attention products
  scaled by the heads kept. It is what a MACs target (``structured_target="macs"``) is planned against.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.structure.compaction import family_units
from lightning_compress.structure.dependency import UnitGroup
from lightning_compress.structure.trace import analysis_mode, as_call


def _flash_attention_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU flash-attention kernel, which ``FlopCounterMode`` has no formula for: ``q @ k`` and
    ``p @ v``, 2 FLOPs per MAC (shapes: (B, H, L, E), (B, H, S, E), (B, H, S, Ev))."""
    *batch, length, width = query
    return 2 * prod(batch) * length * key[-2] * (width + value[-1])


def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_input`` (eval mode, no grad)."""
    args, kwargs = as_call(example_input, model)
    custom = {}
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None:
        custom[flash] = _flash_attention_flops
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with analysis_mode(model), torch.no_grad(), counter:
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


def macs_per_example(model: nn.Module, example_input: Any) -> int:
    """:func:`count_macs` divided by the example input's batch size (the first dimension of its first tensor), so
    that a report's "MACs per example" does not depend on how many examples the example input holds."""
    args, kwargs = as_call(example_input)
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0), None)
    batch = int(first.shape[0]) if first is not None else 1
    return count_macs(model, example_input) // max(batch, 1)


def kept_fractions(
    groups: Mapping[str, UnitGroup], unit_masks: Mapping[str, Tensor]
) -> tuple[dict[str, float], dict[str, float]]:
    """(fraction of its output units, fraction of its input columns) each layer keeps once ``unit_masks`` are
    applied as :func:`~lightning_compress.structure.compaction.compact` would: prunable coupled sets together, in
    whole blocks."""
    out_frac = dict.fromkeys(groups, 1.0)
    kept_cols: dict[str, Tensor] = {}
    done: set[str] = set()
    for name, group in groups.items():
        if not group.prunable or name in done:
            continue
        family = [name, *[c for c in group.coupled if c in groups]]
        done.update(family)
        keep = family_units(group, unit_masks, family)
        if bool(keep.all()):
            continue
        for member in family:
            out_frac[member] = int(keep.sum()) / keep.numel()
        for consumer, repeat, offset in group.consumers:
            if consumer in groups:
                cols = kept_cols.setdefault(consumer, torch.ones(groups[consumer].fan_in, dtype=torch.bool))
                cols[offset : offset + keep.numel() * repeat] &= keep.repeat_interleave(repeat)
    in_frac = {n: int(kept_cols[n].sum()) / kept_cols[n].numel() if n in kept_cols else 1.0 for n in groups}
    return out_frac, in_frac


def estimated_macs(groups: Mapping[str, UnitGroup], unit_masks: Mapping[str, Tensor]) -> float:
    """MACs of the analysed layers after removing what ``unit_masks`` drop (see the module docstring)."""
    out_frac, in_frac = kept_fractions(groups, unit_masks)
    total, seen = 0.0, set()
    for name, group in groups.items():
        total += group.macs * out_frac[name] * in_frac[name]
        if group.attention_macs and name not in seen:  # one value per coupled set
            seen.update([name, *group.coupled])
            total += group.attention_macs * out_frac[name]
    return total


def block_macs(
    groups: Mapping[str, UnitGroup], families: list[list[str]], unit_masks: Mapping[str, Tensor]
) -> list[float]:
    """For each family (a coupled set, ``family[0]`` naming its group): the MACs saved by removing one more of its
    blocks, to first order at the current masks: its producers' rows (times the fraction of their inputs kept),
    its consumers' columns (times the fraction of their outputs kept) and its share of the attention products."""
    out_frac, in_frac = kept_fractions(groups, unit_masks)
    costs = []
    for family in families:
        group = groups[family[0]]
        cost = group.attention_macs / max(group.num_blocks, 1)
        for member in family:
            g = groups[member]
            cost += g.macs / max(g.num_units, 1) * g.block * g.parts * in_frac[member]
        for consumer, repeat, _ in group.consumers:
            if consumer in groups:
                c = groups[consumer]
                cost += c.macs / max(c.fan_in, 1) * group.block * repeat * out_frac[consumer]
        costs.append(cost)
    return costs
