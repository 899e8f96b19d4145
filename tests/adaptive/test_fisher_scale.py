"""The plan and its correction read only the layers' *relative* Fisher scale: a factor common to every layer (a batch
gradient's ``E[g^2]`` against a per-sample Fisher, the fit's statistics against the calibration backward) changes
nothing, while one layer's factor changes the plan. Digits MLP (``tests.adaptive.digits``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
from torch import Tensor, nn

from lightning_compress import Budget, compress
from lightning_compress.adaptive.compress import CompressionResult
from tests.adaptive.digits import Digits, trained_digits


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits(hidden=(128, 64), epochs=15, seed=0)


def _compressed(digits: Digits, scale: Callable[[str], float]) -> CompressionResult:
    """The failed-bound case of ``test_compress``: the first plan fails, one correction measures the layers alone."""
    model = copy.deepcopy(digits.model)
    reference = model[0].weight.detach().clone()

    def metric(m: nn.Module) -> float:
        return -float((m[0].weight.detach() - reference).norm() / reference.norm())

    def scaled(fisher: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: f * scale(name) for name, f in fisher.items()}

    return compress(model, Budget(size=0.2), digits.train, metric_fn=metric, max_metric_drop=0.02, search="bits",
                    sync=scaled)


# id, the factor applied to each layer's Fisher
COMMON = [("times_1e4", 1e4), ("times_1e-4", 1e-4)]


@pytest.mark.parametrize("factor", [c[1] for c in COMMON], ids=[c[0] for c in COMMON])
def test_a_factor_common_to_every_layer_changes_neither_the_plan_nor_the_correction(digits: Digits,
                                                                                     factor: float) -> None:
    plain, scaled = _compressed(digits, lambda _: 1.0), _compressed(digits, lambda _: factor)
    assert any("scores scaled by" in step for step in plain.steps)  # a correction ran: its factors are compared
    assert [r["label"] for r in scaled.plan] == [r["label"] for r in plain.plan]
    assert scaled.steps == plain.steps and scaled.evaluations == plain.evaluations
    for ours, theirs in zip(scaled.plan, plain.plan):
        assert ours["predicted"] == pytest.approx(theirs["predicted"] * factor, rel=1e-5)
        assert ours["corrected"] / ours["predicted"] == pytest.approx(theirs["corrected"] / theirs["predicted"],
                                                                      rel=1e-5)


def test_one_layers_factor_changes_the_first_plan(digits: Digits) -> None:
    """The contrast: what the knapsack trades is each layer's scale against the others'."""
    plain = _compressed(digits, lambda _: 1.0)
    heavier = _compressed(digits, lambda name: 1e4 if name == "0" else 1.0)
    assert heavier.steps[0] != plain.steps[0]
