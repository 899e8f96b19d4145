"""The uniform configurations search="joint" measures its plan against (:mod:`lightning_compress.adaptive.rivals`):
which ones are offered, what they are compared on without a metric, and that compress() delivers the best measured
of the plan and them, within the budget, with the evaluations counted."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress import Budget, compress
from lightning_compress.adaptive import BudgetError
from lightning_compress.adaptive.candidates import Candidate
from lightning_compress.adaptive.compress import FISHER_BATCHES
from lightning_compress.adaptive.plan import Problem
from lightning_compress.adaptive.rivals import (
    HEADER_SLACK,
    UNIFORM_TRIED,
    OutputError,
    TopOneLoss,
    against_float,
    uniform_plans,
)
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.quantization.calibration import feed
from tests.adaptive.digits import Digits, accuracy, trained_digits


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits(hidden=(128, 64), epochs=15, seed=0)


def _c(layer: str, bits: int, grain: str | None, group: int | None, nbytes: int, score: float) -> Candidate:
    return Candidate(layer, bits, grain, group, 0.0, nbytes, 0, score)


def _problem(cap: int) -> Problem:
    """Layer "a" has groups of 32, layer "b" (a small input) only per channel."""
    a = [_c("a", 2, "per_channel", None, 10, 9.0), _c("a", 2, "per_group", 32, 14, 5.0),
         _c("a", 4, "per_channel", None, 20, 1.0), _c("a", FLOAT_BITS, None, None, 80, 0.0)]
    b = [_c("b", 2, "per_channel", None, 5, 1.0), _c("b", 4, "per_channel", None, 8, 0.5),
         _c("b", FLOAT_BITS, None, None, 30, 0.0)]
    return Problem({"a": a, "b": b}, fixed_bytes=0, other_macs=0, size_cap=cap, macs_cap=None)


def test_uniform_plans_fit_the_cap_fall_back_to_per_channel_and_come_lowest_predicted_first() -> None:
    plans = uniform_plans(_problem(cap=26), header=HEADER_SLACK)  # the slack is what is left of the header
    labels = [(p["a"].label(), p["b"].label()) for p in plans]
    # int4 (28 B) is over the cap, float never offered; g32 falls back to per channel on "b"
    assert labels == [("int2 g32", "int2 per-channel"), ("int2 per-channel", "int2 per-channel")]
    assert uniform_plans(_problem(cap=200), header=HEADER_SLACK)[0]["a"].label() == "int4 per-channel"
    assert uniform_plans(_problem(cap=14), header=HEADER_SLACK) == []
    assert len(uniform_plans(_problem(cap=14), header=0)) == 3  # within the slack: offered, the file decides


def test_top_one_loss_is_the_cross_entropy_against_the_float_models_predictions(digits: Digits) -> None:
    model = copy.deepcopy(digits.model)
    measure = TopOneLoss(model, digits.train[:3], feed)
    assert measure(model) == 0.0
    with torch.no_grad():
        model[0].weight.add_(0.05 * torch.randn_like(model[0].weight))
    expected = 0.0
    for x, _ in digits.train[:3]:
        labels = digits.model(x).argmax(1)
        with torch.no_grad():
            expected += float(F.cross_entropy(model(x), labels) - F.cross_entropy(digits.model(x), labels)) / 3
    assert measure(model) == pytest.approx(expected, rel=1e-5)
    assert measure(model) > 0


def test_a_uniform_configuration_that_measures_better_is_delivered_and_counted(digits: Digits) -> None:
    """A metric only the middle layer's error moves (its weight's relative error): the Fisher does not know it, the
    solver's plan (search="bits": the same plan, not compared) gives that layer fewer bits than a uniform one."""
    reference = digits.model[2].weight.detach().clone()

    def metric(m: nn.Module) -> float:
        return -float((m[2].weight.detach() - reference).norm() / reference.norm())

    solved = compress(copy.deepcopy(digits.model), Budget(size=0.17), digits.train, metric_fn=metric, search="bits")
    model = copy.deepcopy(digits.model)
    joint = compress(model, Budget(size=0.17), digits.train, metric_fn=metric)
    assert joint.metric_after is not None and solved.metric_after is not None
    assert joint.metric_after > solved.metric_after
    assert joint.metric_after == pytest.approx(metric(model))
    compared = next(s for s in joint.steps if s.startswith("compared on the metric"))
    assert "delivered: uniform" in compared
    assert joint.evaluations == 1 + 1 + UNIFORM_TRIED  # before, the plan, the uniform configurations
    assert joint.file_bytes is not None and joint.budget_bytes is not None and joint.file_bytes <= joint.budget_bytes
    assert len({row["label"].split(" ")[0] for row in joint.plan}) == 1  # one width everywhere


def test_without_a_metric_the_top_one_loss_chooses_and_never_raises_it(digits: Digits) -> None:
    measure = TopOneLoss(digits.model, digits.train[:FISHER_BATCHES], feed)  # the batches compress() takes
    for size in (0.13, 0.2):
        solved = copy.deepcopy(digits.model)
        compress(solved, Budget(size=size), digits.train, search="bits")
        model = copy.deepcopy(digits.model)
        result = compress(model, Budget(size=size), digits.train)
        assert any(s.startswith("compared on the top-1 loss") for s in result.steps)
        assert measure(model) <= measure(solved) + 1e-9
        assert result.evaluations == 0 and result.file_bytes <= result.budget_bytes  # type: ignore[operator]


def test_a_loss_fn_without_a_metric_compares_nothing(digits: Digits) -> None:
    def loss_fn(output: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(output, batch[1])

    result = compress(copy.deepcopy(digits.model), Budget(size=0.12), digits.train, loss_fn=loss_fn)
    assert not any(s.startswith("compared") for s in result.steps)
    assert any(row["bits"] == 2 for row in result.plan)  # a dense 2-bit plan, yet nothing to measure a sparse one on
    assert all(row["sparsity"] == 0 for row in result.plan)


def test_where_the_dense_plan_needs_2_bits_a_sparse_plan_is_measured_beside_it(digits: Digits) -> None:
    measure = TopOneLoss(digits.model, digits.train[:FISHER_BATCHES], feed)
    dense, sparse, model = (copy.deepcopy(digits.model) for _ in range(3))
    compress(dense, Budget(size=0.12), digits.train, search="bits")
    compress(sparse, Budget(size=0.12), digits.train, search="all")
    result = compress(model, Budget(size=0.12), digits.train)
    assert any(s.startswith("the dense plan puts a layer at 2 bits") for s in result.steps)
    assert "the dense plan" in next(s for s in result.steps if s.startswith("compared"))
    assert measure(model) <= min(measure(dense), measure(sparse)) + 1e-9
    assert result.file_bytes is not None and result.budget_bytes is not None
    assert result.file_bytes <= result.budget_bytes


def test_joint_offers_sparsity_where_no_dense_plan_fits(digits: Digits) -> None:
    model = copy.deepcopy(digits.model)
    with pytest.raises(BudgetError, match="smallest file this model can be written as") as info:
        compress(copy.deepcopy(digits.model), Budget(size=6000), digits.train, search="bits")
    dense, _ = info.value.smallest  # type: ignore[misc]
    assert dense > 6000
    result = compress(model, Budget(size=6000), digits.train)
    assert result.file_bytes is not None and result.file_bytes <= 6000
    assert any(row["sparsity"] > 0 for row in result.plan)
    assert any(s.startswith("no dense plan fits") for s in result.steps)
    assert accuracy(model, digits.test) > 0.5


class _Tokens(nn.Module):
    """Token states ``(N, L, D)``: no class in the last dimension (review finding 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(64, 4 * 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x).reshape(x.shape[0], 4, 16)


def test_against_float_reads_top_one_only_for_a_classifiers_logits(digits: Digits) -> None:
    assert isinstance(against_float(digits.model, digits.train[:2], feed), TopOneLoss)
    tokens = _Tokens()
    measure = against_float(tokens, digits.train[:2], feed)
    assert type(measure) is OutputError
    assert measure(tokens) == 0.0
    with torch.no_grad():
        tokens.embed.weight.mul_(1.1)  # every output grows about 10 %: argmax of the last dimension may not move
    assert 0.001 < measure(tokens) < 0.05
    assert "output error" in measure.describes


def test_a_non_classifier_without_a_metric_is_compared_on_its_output_error(digits: Digits) -> None:
    tokens = _Tokens()
    result = compress(tokens, Budget(size=0.3), digits.train[:FISHER_BATCHES], forward=feed,
                      loss_fn=None, metric_fn=None)
    assert any("output error relative to the float outputs" in step for step in result.steps)
    assert not any("top-1" in step for step in result.steps)
