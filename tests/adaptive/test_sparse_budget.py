"""Sparsity under a size budget (``search="all"``): pruned layers are priced in the bytes of the sparse layout the
export writes, the planner takes them where the predicted loss says they pay, and the file on disk is what the plan
predicted, byte for byte (digits MLP)."""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest
import torch

from lightning_compress import Budget, compress, save_quantized
from lightning_compress.adaptive.costs import fixed_bytes
from lightning_compress.quantization import load_quantized
from lightning_compress.quantization.export import read_metadata
from tests.adaptive.digits import Digits, trained_digits

LINEARS = ("0", "2", "4")


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits(hidden=(128, 64), epochs=15, seed=0)


def _header(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


@pytest.mark.parametrize("size", [0.11, 0.13])
def test_search_all_prunes_under_a_size_budget_and_the_file_is_the_plan(digits: Digits, tmp_path: Path,
                                                                         size: float) -> None:
    model = copy.deepcopy(digits.model)
    fixed = fixed_bytes(model, {name: f"{name}.weight" for name in LINEARS})
    result = compress(model, Budget(size=size), digits.train, search="all")
    path = save_quantized(model, tmp_path / "m.safetensors")
    on_disk = path.stat().st_size
    assert result.file_bytes == on_disk <= result.budget_bytes  # type: ignore[operator]
    assert fixed + sum(row["bytes"] for row in result.plan) + _header(path) == on_disk
    sparse = {row["layer"] for row in result.plan if row["sparsity"] > 0}
    assert sparse, result.plan  # the planner took sparsity: it pays in bytes now
    layouts = {key.removesuffix(".weight"): info.get("layout", "dense")
               for key, info in read_metadata(path)["layers"].items()}
    assert all(layouts[name] in ("bitmap", "gaps") for name in sparse), layouts
    for name in sparse:
        weight = model.get_submodule(name).weight
        row = next(r for r in result.plan if r["layer"] == name)
        assert float((weight == 0).float().mean()) >= row["sparsity"]
    reloaded = load_quantized(copy.deepcopy(digits.model), path)
    assert torch.equal(reloaded(digits.test[0]), model(digits.test[0]))


def test_search_joint_without_a_macs_cap_offers_sparsity_only_where_the_dense_plan_needs_2_bits(
        digits: Digits) -> None:
    """Under a size budget alone, ``joint`` keeps every layer dense where the dense plan needs no 2-bit layer (0.2x);
    where it does (0.13x) sparsity is offered too and the dense plan is measured beside the sparse one."""
    roomy = compress(copy.deepcopy(digits.model), Budget(size=0.2), digits.train)
    assert all(row["sparsity"] == 0 for row in roomy.plan)
    assert not any("sparsity offered" in step for step in roomy.steps)
    tight = compress(copy.deepcopy(digits.model), Budget(size=0.13), digits.train)
    assert any("the dense plan puts a layer at 2 bits" in step for step in tight.steps)
    assert any("the dense plan" in step and "compared on" in step for step in tight.steps)
