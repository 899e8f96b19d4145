"""Structured pruning on the quantizer's grid: when per-group quantization in the same fit quantizes each layer's
input in groups of ``group_size``, the widths that compaction leaves must be multiples of it. No Lightning import.

The quantizer groups a layer's *input* columns; compaction shrinks a consumer's input to the units its producer
keeps. So each prunable layer of single units keeps a multiple of ``group_size`` units (the planner's ``round_to``,
set automatically), and what rounding cannot fix (a dense width off the grid, attention heads removed whole whose
width is off it) is refused before training instead of surfacing at the end of the fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_compress.pruning.structured import layout, unit_families


def grid_round_to(round_to: int, group_size: int, source: str) -> int:
    """The ``round_to`` a fit uses under a quantizer (``source`` names it) grouping by ``group_size``:
    ``group_size`` itself when the user left ``round_to`` at 1; the user's when it is a multiple of it."""
    if round_to == 1 or round_to % group_size == 0:
        return max(round_to, group_size)
    raise ValueError(
        f"`round_to`={round_to} conflicts with {source} in the same Trainer: compacted widths must be multiples of "
        f"{group_size} for per-group quantization, and multiples of {round_to} are not; allowed: leave `round_to` "
        f"at 1 (it then becomes {group_size}) or a multiple of {group_size}"
    )


def grid_misfits(selected: list[str], groups: Mapping[str, Any] | None, num_units: Mapping[str, int],
                 multiple: int) -> dict[str, str]:
    """Prunable layers whose compacted width cannot be a multiple of ``multiple``, by name, with why: a layer of
    single units whose dense width is off the grid, or one losing whole blocks (heads) whose width is off it."""
    out = {}
    for family in unit_families(selected, groups):
        lay = layout(family[0], groups, num_units[family[0]])
        if lay.block > 1 and lay.block % multiple:
            out[family[0]] = f"loses whole heads of {lay.block} units"
        elif lay.block == 1 and lay.parts > 1:
            out[family[0]] = f"its units come in {lay.parts} parts, which rounding does not handle"
        elif lay.block == 1 and lay.units % multiple:
            out[family[0]] = f"{lay.units} units"
    return out
