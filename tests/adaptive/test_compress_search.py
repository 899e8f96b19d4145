"""compress(search=...): the baselines bench_adaptive compares the joint plan with. ``"bits"`` never prunes (what
ModelOpt's auto_quantize searches), ``"sparsity"`` keeps every layer at one width and chooses only sparsity and
granularity; both stay within the budget, and an unknown search is refused before any change. ``"joint"`` delivers
the dense plan that fit where the sparse problem's larger header leaves none, and refuses naming the smaller file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lightning_compress import Budget, compress, quantize, save_quantized
from lightning_compress.adaptive import BudgetError
from lightning_compress.adaptive.compress import SPARSITY_ONLY_BITS
from tests.adaptive.digits import Digits, trained_digits


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits(hidden=(64,), epochs=8, seed=0)


def test_bits_search_never_prunes(digits: Digits) -> None:
    joint = compress(copy.deepcopy(digits.model), Budget(size=0.3, macs=0.6), digits.train)
    assert any(row["sparsity"] > 0 for row in joint.plan)  # the cap needs pruning: the joint search prunes
    bits = compress(copy.deepcopy(digits.model), Budget(size=0.3), digits.train, search="bits")
    assert all(row["sparsity"] == 0 for row in bits.plan)
    assert bits.file_bytes is not None and bits.budget_bytes is not None and bits.file_bytes <= bits.budget_bytes
    with pytest.raises(BudgetError, match="no plan that fits"):  # a MACs cap only pruning could meet
        compress(copy.deepcopy(digits.model), Budget(size=0.3, macs=0.6), digits.train, search="bits")


def test_sparsity_search_keeps_one_width_and_meets_the_macs_cap(digits: Digits) -> None:
    model = copy.deepcopy(digits.model)
    result = compress(model, Budget(macs=0.5), digits.train, search="sparsity")
    assert {row["bits"] for row in result.plan} == {SPARSITY_ONLY_BITS}
    assert any(row["sparsity"] > 0 for row in result.plan)
    assert result.macs is not None and result.budget_macs is not None and result.macs <= result.budget_macs


def test_an_unknown_search_is_refused_before_any_change(digits: Digits) -> None:
    model = copy.deepcopy(digits.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"search.*'width'"):
        compress(model, Budget(size=0.3), digits.train, search="width")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _file(model: torch.nn.Module, folder: Path) -> int:
    return save_quantized(model, folder / "u.safetensors").stat().st_size


def test_joint_delivers_the_dense_plan_its_sparse_header_would_refuse(tmp_path: Path) -> None:
    """One Linear(64, 10): uniform int2 per channel fits the budget, so sparsity is offered too (a layer at 2 bits;
    ``"all"``: always); the sparse cheapest plan's header is larger and left no plan within the cap, and the budget
    was refused naming that larger file. The dense plan that fits is delivered, and one byte below it the refusal
    names its file."""
    single = trained_digits(hidden=(), epochs=5, seed=0)
    uniform = copy.deepcopy(single.model)
    quantize(uniform, bits=2, granularity="per_channel", calibration="mse")
    smallest_dense = _file(uniform, tmp_path)
    for search, cap in (("joint", smallest_dense), ("joint", smallest_dense + 24), ("all", smallest_dense)):
        model = copy.deepcopy(single.model)
        result = compress(model, Budget(size=cap), single.train[:4], calibration_batches=4, search=search)
        assert result.file_bytes is not None and result.file_bytes <= cap, search
        assert result.save(tmp_path / "m.safetensors").stat().st_size == result.file_bytes
    for search in ("joint", "all"):
        with pytest.raises(BudgetError, match="can be written as is") as info:
            compress(copy.deepcopy(single.model), Budget(size=smallest_dense - 1), single.train[:4],
                     calibration_batches=4, search=search)
        assert info.value.smallest == (smallest_dense, None), search


def test_without_a_bound_the_refusal_names_the_smallest_budget_a_plan_fits(digits: Digits) -> None:
    """``"bits"`` never prunes: a MACs cap below the dense count has no plan. The refusal names a budget just above
    the dense count, found by bisection below the first :data:`BUDGET_STEPS` factor that fits (that factor alone
    named 1.2x the dense count), and speaks of no bound, as there is none."""
    dense = sum(m.weight.numel() for m in digits.model.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(BudgetError, match="no plan that fits") as info:
        compress(copy.deepcopy(digits.model), Budget(size=0.3, macs=0.6), digits.train, search="bits")
    size, macs = info.value.smallest  # type: ignore[misc]
    assert macs is not None and dense <= macs <= 1.02 * dense
    assert "bound" not in str(info.value)
    fits = compress(copy.deepcopy(digits.model), Budget(size=size, macs=macs), digits.train, search="bits")
    assert fits.macs is not None and fits.macs <= macs
