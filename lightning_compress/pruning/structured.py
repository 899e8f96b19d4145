"""Structured pruning's units: which selected layers can lose output units, which of them share their units
(coupled sets: producers a residual add sums, the q / k / v of one attention), and how units group into *blocks*
that go together (an attention head: ``head_dim`` rows of q, k and v). No Lightning import.

Unit masks are over the rows of each layer's unit weight (a Linear's weight rows, an attention module's
``in_proj_weight`` rows); scores come per row from the gradient statistics, and a block's score is the mean of its
rows' scores over its parts and over the members of its coupled set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


def unit_families(selected: Iterable[str], groups: Mapping[str, Any] | None) -> list[list[str]]:
    """The selected layers that can lose units, as sets that share their units: a layer alone, or the producers a
    residual add / an attention couples (those of them that are selected). ``groups`` are the dependency analysis's
    ``UnitGroup`` s by layer name. Before the analysis ran (``groups`` None or empty) every layer stands alone;
    after it, a selected layer it has no group for (an ``Embedding``: its rows are no output units) is left out."""
    analysed = bool(groups)
    groups = groups or {}
    selected = list(selected)
    prunable = [n for n in selected if (n not in groups and not analysed) or (n in groups and groups[n].prunable)]
    families, seen = [], set()
    for name in prunable:
        if name in seen:
            continue
        coupled = groups[name].coupled if groups.get(name) is not None else []
        family = [name] + [c for c in coupled if c in prunable and c not in seen]
        seen.update(family)
        families.append(family)
    return families


@dataclass(frozen=True)
class BlockLayout:
    """Rows = ``parts`` copies of ``units`` units; units go in blocks of ``block``."""

    rows: int
    parts: int = 1
    block: int = 1

    @property
    def units(self) -> int:
        return self.rows // self.parts

    @property
    def blocks(self) -> int:
        return self.units // self.block

    @property
    def rows_per_block(self) -> int:
        return self.block * self.parts

    def to_blocks(self, per_row: Tensor, reduce: str = "mean") -> Tensor:
        """(rows,) -> (blocks,): the mean (scores), ``any`` (keep-masks) or ``all`` (flags) over each block's rows."""
        view = per_row.reshape(self.parts, self.blocks, self.block).transpose(0, 1).reshape(self.blocks, -1)
        if reduce == "any":
            return view.any(1)
        if reduce == "all":
            return view.all(1)
        return view.float().mean(1)

    def to_rows(self, per_block: Tensor) -> Tensor:
        """(blocks,) -> (rows,): every row of a block takes the block's value."""
        return per_block.repeat_interleave(self.block).repeat(self.parts)


def layout(name: str, groups: Mapping[str, Any] | None, rows: int) -> BlockLayout:
    group = (groups or {}).get(name)
    if group is None:
        return BlockLayout(rows)
    return BlockLayout(rows, group.parts, group.block)


def family_blocks(family: list[str], per_row: Mapping[str, Tensor], layouts: Mapping[str, BlockLayout]) -> Tensor:
    """One score per block of a coupled set: the mean of its rows' scores over parts and members."""
    return torch.stack([layouts[n].to_blocks(per_row[n].detach().float().cpu()) for n in family]).mean(0)


def family_mask(family: list[str], unit_masks: Mapping[str, Tensor], num_units: int, device: Any = None) -> Tensor:
    """The rows a family keeps: those every member keeps (all of them before the first event)."""
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


def analyse(model: nn.Module, example_input: Any, selected: list[str]) -> tuple[dict[str, Any], str]:
    """The dependency analysis of ``model`` on ``example_input``, for the layers a structured run selected: their
    unit groups, and a table of which are prunable and which are refused, and why (for the log). Raises a
    ``ValueError`` naming the reasons when none of them can lose units."""
    from lightning_compress.structure.dependency import find_unit_groups, prunability_table

    groups = find_unit_groups(model, example_input)
    table = prunability_table({name: group for name, group in groups.items() if name in selected})
    if not unit_families(selected, groups):
        reasons = {name: groups[name].reason for name in selected if name in groups}
        raise ValueError(f"structured pruning: no selected layer can lose units safely: {reasons}")
    return groups, table


def check_round_to(round_to: int, selected: list[str], groups: Mapping[str, Any] | None,
                   num_units: Mapping[str, int]) -> None:
    """Refuse a ``round_to`` that no layer can honour: a layer of single units (not heads) keeps at least one
    multiple of ``round_to``, so a layer of ``round_to`` units or fewer is never pruned; when that is every layer,
    the run would ask for sparsity, deliver none and call each event accepted."""
    if round_to <= 1:
        return
    sizes = {f[0]: num_units[f[0]] for f in unit_families(selected, groups)
             if layout(f[0], groups, num_units[f[0]]) == BlockLayout(num_units[f[0]])}
    if not any(size > round_to for size in sizes.values()):
        largest = max(sizes.values(), default=0)
        allowed = f"a `round_to` below {largest}" if largest > 1 else "`round_to`=1"
        raise ValueError(
            f"`round_to`={round_to} leaves nothing to prune: each layer keeps at least one multiple of {round_to} "
            f"units, and no prunable layer of single units has more (units per layer: {sizes or 'none'}; attention "
            f"heads are not rounded); allowed: {allowed}"
        )
