"""compress(method="gptq") on the digits MLP (real data): the RTN plan's widths applied with GPTQ, kept only where
measured no worse and within the budget; the file round-trips; bad arguments refused before any change."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_compress import Budget, compress, save_quantized
from lightning_compress.quantization import load_quantized
from lightning_compress.quantization.carried import carried
from tests.adaptive.digits import Digits, accuracy, trained_digits


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits(hidden=(128, 64), epochs=15, seed=0)


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_gptq_applies_the_rtn_plans_widths_within_the_budget_and_is_kept_when_better(digits: Digits,
                                                                                      tmp_path: Path) -> None:
    def metric(model: nn.Module) -> float:
        return accuracy(model, digits.val)

    budget = Budget(size=0.13)  # tight: int2 / int3 layers, where RTN loses validation accuracy
    rtn_model, gptq_model = copy.deepcopy(digits.model), copy.deepcopy(digits.model)
    # search="bits": the solver's plan as it is (the default also measures uniform configurations beside it)
    rtn = compress(rtn_model, budget, digits.train, metric_fn=metric, search="bits")
    gptq = compress(gptq_model, budget, digits.train, metric_fn=metric, method="gptq", search="bits")
    assert rtn.method == "rtn" and gptq.method == "gptq"
    assert [row["label"] for row in gptq.plan] == [row["label"] for row in rtn.plan]  # the same widths
    assert gptq.metric_after is not None and rtn.metric_after is not None
    assert gptq.metric_after > rtn.metric_after  # measured on the validation split; kept because better
    assert accuracy(gptq_model, digits.test) >= accuracy(rtn_model, digits.test)  # an independent split agrees
    assert gptq.evaluations == rtn.evaluations + 1
    record = carried(gptq_model)
    assert record is not None and record.source == "compress() gptq" and not record.stale(gptq_model)
    path = save_quantized(gptq_model, tmp_path / "m.safetensors")
    assert path.stat().st_size == gptq.file_bytes <= gptq.budget_bytes  # type: ignore[operator]
    loaded = copy.deepcopy(digits.model)
    load_quantized(loaded, path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), gptq_model.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(rtn_model.state_dict().values(),
                                                     gptq_model.state_dict().values()))


def test_gptq_worse_on_the_metric_leaves_the_rtn_plan_exactly(digits: Digits) -> None:
    rtn_model = copy.deepcopy(digits.model)
    compress(rtn_model, Budget(size=0.2), digits.train)
    target = _weights(rtn_model)

    def closeness_to_rtn(model: nn.Module) -> float:  # RTN's own weights score best: GPTQ is measured worse
        return -sum(float((v - target[k]).abs().sum()) for k, v in model.state_dict().items())

    model = copy.deepcopy(digits.model)
    result = compress(model, Budget(size=0.2), digits.train, metric_fn=closeness_to_rtn, method="gptq")
    assert result.method == "rtn"
    assert "it is worse on the metric" in result.steps[-1] and "round to nearest kept" in result.steps[-1]
    assert all(torch.equal(v, target[k]) for k, v in model.state_dict().items())
    record = carried(model)
    assert record is not None and record.source == "compress()" and not record.stale(model)


def test_without_a_metric_gptq_is_judged_on_the_kl_to_the_float_outputs(digits: Digits) -> None:
    model = copy.deepcopy(digits.model)
    result = compress(model, Budget(size=0.13), digits.train, method="gptq")
    assert "KL to the float outputs" in result.steps[-1]
    assert result.evaluations == 0 and result.file_bytes is not None
    assert result.file_bytes <= result.budget_bytes  # type: ignore[operator]
    assert not carried(model).stale(model)  # type: ignore[union-attr]


BAD_ARGUMENTS: list[tuple[str, dict[str, Any], type[Exception], tuple[str, ...]]] = [
    ("method_unknown", {"method": "awq"}, ValueError, ("method", "'awq'", "gptq", "rtn")),
    ("method_not_str", {"method": 1}, ValueError, ("method", "1")),
    ("gptq_latency", {"method": "gptq", "budget": Budget(latency=0.5)}, ValueError,
     ("method", "'gptq'", "latency=0.5", "'rtn'")),
]


@pytest.mark.parametrize(("kwargs", "error", "texts"), [c[1:] for c in BAD_ARGUMENTS],
                         ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_methods_are_refused_before_any_change(digits: Digits, kwargs: dict[str, Any], error: type[Exception],
                                                   texts: tuple[str, ...]) -> None:
    model = copy.deepcopy(digits.model)
    before = _weights(model)
    with pytest.raises(error) as info:
        compress(model, **{"budget": Budget(size=0.2), "calibration_data": digits.train, **kwargs})
    for text in texts:
        assert text in str(info.value), (text, str(info.value))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert carried(model) is None
