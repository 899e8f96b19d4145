"""compress(search=...): the baselines bench_adaptive compares the joint plan with. ``"bits"`` never prunes (what
ModelOpt's auto_quantize searches), ``"sparsity"`` keeps every layer at one width and chooses only sparsity and
granularity; both stay within the budget, and an unknown search is refused before any change."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_compress import Budget, compress
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
