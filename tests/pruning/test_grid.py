"""The quantizer's grid as the structured planner's ``round_to``, without a Trainer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lightning_compress.pruning.grid import grid_misfits, grid_round_to

SOURCE = "PostTrainingQuantization(group_size=32)"


@pytest.mark.parametrize(("round_to", "expected"), [(1, 32), (32, 32), (64, 64)])
def test_round_to_becomes_the_group_size_or_a_multiple_of_it(round_to: int, expected: int) -> None:
    assert grid_round_to(round_to, 32, SOURCE) == expected


@pytest.mark.parametrize("round_to", [8, 48])
def test_a_conflicting_round_to_is_refused_naming_both(round_to: int) -> None:
    with pytest.raises(ValueError) as info:
        grid_round_to(round_to, 32, SOURCE)
    assert f"`round_to`={round_to}" in str(info.value) and SOURCE in str(info.value)


def _group(parts: int = 1, block: int = 1, coupled: tuple[str, ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(prunable=True, coupled=list(coupled), parts=parts, block=block, reason="")


def test_misfits_are_widths_off_the_grid_and_heads_of_an_off_grid_width() -> None:
    groups = {"fc1": _group(), "fc2": _group(), "attn": _group(parts=3, block=24), "heads": _group(parts=3, block=32),
              "out": SimpleNamespace(prunable=False, coupled=[], parts=1, block=1, reason="output")}
    units = {"fc1": 64, "fc2": 48, "attn": 3 * 96, "heads": 3 * 128, "out": 10}
    assert grid_misfits(list(units), groups, units, 32) == {"fc2": "48 units", "attn": "loses whole heads of 24 units"}
