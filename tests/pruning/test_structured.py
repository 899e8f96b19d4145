"""Coupled sets and blocks: which layers prune together, how row scores and masks fold into heads and back."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.pruning.structured import (
    BlockLayout,
    check_round_to,
    family_blocks,
    unit_families,
    unit_sparsity,
)
from lightning_compress.structure.dependency import UnitGroup


def test_layout_folds_parts_and_blocks() -> None:
    lay = BlockLayout(rows=12, parts=3, block=2)  # q, k, v of 2 heads of 2 units
    assert (lay.units, lay.blocks, lay.rows_per_block) == (4, 2, 6)
    rows = torch.arange(12.0)  # q: 0-3, k: 4-7, v: 8-11; head 0 = rows 0,1,4,5,8,9
    expected = torch.tensor([(0 + 1 + 4 + 5 + 8 + 9) / 6, (2 + 3 + 6 + 7 + 10 + 11) / 6])
    torch.testing.assert_close(lay.to_blocks(rows), expected)
    keep = torch.tensor([False, True])
    assert lay.to_rows(keep).tolist() == [False, False, True, True] * 3
    partial = torch.ones(12, dtype=torch.bool)
    partial[9] = False  # one row of head 0
    assert lay.to_blocks(partial, "any").tolist() == [True, True]
    assert lay.to_blocks(partial, "all").tolist() == [False, True]


def test_family_blocks_average_the_members() -> None:
    layouts = {"q": BlockLayout(4, block=2), "k": BlockLayout(4, block=2)}
    scores = family_blocks(["q", "k"], {"q": torch.tensor([1.0, 1, 5, 5]), "k": torch.tensor([3.0, 3, 1, 1])}, layouts)
    torch.testing.assert_close(scores, torch.tensor([2.0, 3.0]))


def test_families_after_the_analysis_leave_out_layers_without_units() -> None:
    groups = {
        "a": UnitGroup("a", 4, coupled=["b"]), "b": UnitGroup("b", 4, coupled=["a"]),
        "c": UnitGroup("c", 4, prunable=False, reason="model output"),
    }
    assert unit_families(["a", "b", "c", "embedding"], groups) == [["a", "b"]]  # embedding: no group, no units
    assert unit_families(["a", "embedding"], None) == [["a"], ["embedding"]]  # before the analysis: each alone
    masks = {"a": torch.tensor([True, False, True, True]), "b": torch.tensor([True, True, False, True])}
    assert unit_sparsity([["a", "b"]], masks, {"a": 4, "b": 4}) == 0.5  # a coupled set once


def test_round_to_that_no_layer_exceeds_is_refused_naming_the_sizes() -> None:
    groups = {"fc1": UnitGroup("fc1", 16), "fc2": UnitGroup("fc2", 12), "attn": UnitGroup("attn", 96, parts=3, block=8),
              "out": UnitGroup("out", 10, prunable=False, reason="model output")}
    units = {"fc1": 16, "fc2": 12, "attn": 96, "out": 10}
    check_round_to(8, list(units), groups, units)  # fc1 and fc2 can lose units in multiples of 8
    with pytest.raises(ValueError) as info:
        check_round_to(16, list(units), groups, units)  # heads are not rounded; the output layer is not prunable
    assert "`round_to`=16" in str(info.value) and "{'fc1': 16, 'fc2': 12}" in str(info.value)
    assert "a `round_to` below 16" in str(info.value)
