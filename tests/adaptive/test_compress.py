"""compress() on a small MLP trained on sklearn's digits: budgets met as measured on disk and on the delivered
weights, the bound held on an independent split, uniform configurations of equal or larger size matched or beaten,
impossible budgets refused (before any work when the arithmetic shows it) with the floor or the nearest budget."""

from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress import Budget, compress, quantize, save_quantized
from lightning_compress.adaptive import BudgetError
from lightning_compress.adaptive.session import BUDGET_STEPS
from lightning_compress.integration.artifacts import load_compressed
from lightning_compress.quantization import load_quantized
from lightning_compress.quantization.carried import carried
from tests.adaptive.digits import Digits, accuracy, trained_digits

LINEARS = ("0", "2", "4")


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits(hidden=(128, 64), epochs=15, seed=0)


def _loss(model: nn.Module, split: tuple[Tensor, Tensor]) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(split[0]), split[1]))


def _file_size(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return save_quantized(model, os.path.join(folder, "m.safetensors")).stat().st_size


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", [0.15, "12 KiB", 20_000])
def test_the_file_on_disk_is_within_the_budget(digits: Digits, tmp_path: Path, size: Any) -> None:
    model = copy.deepcopy(digits.model)
    result = compress(model, Budget(size=size), digits.train)
    path = save_quantized(model, tmp_path / "m.safetensors")
    assert path.stat().st_size == result.file_bytes <= result.budget_bytes
    assert result.budget_bytes == Budget(size=size).size_bytes(sum(p.numel() * 4 for p in model.parameters()))
    reloaded = load_quantized(copy.deepcopy(digits.model), path)
    assert torch.equal(reloaded(digits.test[0]), model(digits.test[0]))
    assert {row["layer"] for row in result.plan} == set(LINEARS)
    assert all(row["sparsity"] == 0 for row in result.plan)  # no MACs cap: search="joint" offers no sparsity


def test_a_macs_budget_is_met_on_the_delivered_weights(digits: Digits) -> None:
    model = copy.deepcopy(digits.model)
    result = compress(model, Budget(size=0.2, macs=0.5), digits.train)
    linears = [model.get_submodule(name) for name in LINEARS]
    dense = sum(layer.weight.numel() for layer in linears)  # one position per example for an MLP
    assert result.budget_macs == dense // 2
    counted = sum(int(torch.count_nonzero(layer.weight)) for layer in linears)
    assert counted == result.macs <= dense // 2
    assert result.file_bytes is not None and result.file_bytes <= result.budget_bytes  # type: ignore[operator]
    assert any(row["sparsity"] > 0 for row in result.plan)
    assert accuracy(model, digits.test) > 0.8


def test_adaptive_matches_or_beats_every_uniform_configuration_of_equal_or_larger_size(digits: Digits) -> None:
    """Measured on the test split, which neither the plan nor the Fisher saw: the test loss summed over the
    configurations is lower, and no configuration's accuracy is better by more than 1 point (3-4 of 360 images,
    the spread between training seeds)."""
    adaptive_losses, uniform_losses, gains = [], [], []
    for bits in (2, 3, 4):
        for granularity in ("per_channel", "per_group"):
            uniform = copy.deepcopy(digits.model)
            quantize(uniform, bits=bits, granularity=granularity, group_size=32, calibration="mse")
            size = _file_size(uniform)
            adaptive = copy.deepcopy(digits.model)
            result = compress(adaptive, Budget(size=size), digits.train)
            assert result.file_bytes is not None and result.file_bytes <= size
            adaptive_losses.append(_loss(adaptive, digits.test))
            uniform_losses.append(_loss(uniform, digits.test))
            gains.append(accuracy(adaptive, digits.test) - accuracy(uniform, digits.test))
    assert sum(adaptive_losses) < sum(uniform_losses)
    assert min(gains) >= -0.01, gains
    assert max(gains) > 0, gains


def test_the_bound_holds_on_an_independent_split(digits: Digits) -> None:
    model = copy.deepcopy(digits.model)
    bound = 0.02
    result = compress(model, Budget(size=0.15), digits.train, metric_fn=lambda m: _loss(m, digits.val),
                      max_metric_drop=bound, higher_is_better=False)
    assert result.metric_after is not None and result.metric_before is not None
    assert result.metric_after - result.metric_before <= bound
    assert _loss(model, digits.test) - _loss(digits.model, digits.test) <= bound
    assert result.evaluations >= 2 and result.steps


REFUSED_EARLY = [
    ("size_below_floor", Budget(size=0.02), "floor", "only one scale per row"),
    ("size_bytes_below_floor", Budget(size=1000), "1000 bytes", "floor"),
    ("macs_below_floor", Budget(macs=0.05), "floor", "largest sparsity"),
]


@pytest.mark.parametrize(("budget", "first", "second"), [c[1:] for c in REFUSED_EARLY],
                         ids=[c[0] for c in REFUSED_EARLY])
def test_budgets_below_the_floor_are_refused_before_any_work(digits: Digits, budget: Budget, first: str,
                                                             second: str) -> None:
    model = copy.deepcopy(digits.model)
    before = _weights(model)
    calls = []

    def loss_fn(output: Tensor, batch: Any) -> Tensor:
        calls.append(1)
        return F.cross_entropy(output, batch[1])

    with pytest.raises(ValueError, match="floor") as info:
        compress(model, budget, digits.train, loss_fn=loss_fn)
    assert first in str(info.value) and second in str(info.value)
    assert calls == []  # no backward pass ran
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_budget_the_bound_cannot_meet_gives_the_smallest_that_did_and_restores_the_model(digits: Digits) -> None:
    model = copy.deepcopy(digits.model)
    before = _weights(model)
    with pytest.raises(BudgetError, match="smallest budget that met the bound") as info:
        compress(model, Budget(size=0.12), digits.train, metric_fn=lambda m: accuracy(m, digits.val),
                 max_metric_drop=0.002)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert carried(model) is None
    smallest, _ = info.value.smallest  # type: ignore[misc]
    asked = Budget(size=0.12).size_bytes(sum(t.numel() * 4 for t in before.values()))
    assert smallest is not None and smallest > asked
    assert smallest not in {math.floor(asked * f) for f in BUDGET_STEPS}  # bisected below the step that held
    result = compress(model, Budget(size=smallest), digits.train, metric_fn=lambda m: accuracy(m, digits.val),
                      max_metric_drop=0.002)
    assert result.file_bytes is not None and result.file_bytes <= smallest


def test_a_budget_below_the_smallest_file_is_refused_with_it(digits: Digits) -> None:
    model = copy.deepcopy(digits.model)
    floor_plus = 4000  # above the tensor-data floor, below the sparsest plan's data plus its header
    with pytest.raises(BudgetError, match="smallest file this model can be written as") as info:
        compress(model, Budget(size=floor_plus), digits.train)
    cheapest, _ = info.value.smallest  # type: ignore[misc]
    assert cheapest > floor_plus
    result = compress(model, Budget(size=cheapest), digits.train)
    assert result.file_bytes == cheapest
    with pytest.raises(BudgetError, match=f"can be written as is {cheapest} bytes"):  # the smallest: one below fails
        compress(copy.deepcopy(digits.model), Budget(size=cheapest - 1), digits.train)
    uniform = copy.deepcopy(digits.model)
    quantize(uniform, bits=2, granularity="per_channel", calibration="mse")
    assert _file_size(uniform) >= cheapest  # never a larger floor than the dense int2 file (review 9, finding 1)


def test_a_failed_bound_is_corrected_by_measuring_layers_alone(digits: Digits) -> None:
    """A metric that only the first layer's error moves (the relative error of its weight): the Fisher does not
    know that, the first plan fails, the measured correction moves bytes to that layer and the bound holds."""
    model = copy.deepcopy(digits.model)
    reference = model[0].weight.detach().clone()

    def metric(m: nn.Module) -> float:
        return -float((m[0].weight.detach() - reference).norm() / reference.norm())

    # search="bits": the solver's plans alone, not measured beside the uniform configurations ("joint")
    result = compress(model, Budget(size=0.2), digits.train, metric_fn=metric, max_metric_drop=0.02, search="bits")
    assert result.metric_after is not None and -result.metric_after <= 0.02
    assert "drop 0.0" in result.steps[0] and "measured 3 layers alone" in result.steps[1]
    first_drop = float(result.steps[0].rsplit("drop ", 1)[1].rstrip(")"))
    assert first_drop > 0.02
    assert result.evaluations == 1 + 1 + 3 + 1 + 3 + 1  # before, plan, 3 alone, plan, 3 alone, plan
    rows = {row["layer"]: row for row in result.plan}
    factor = {name: row["corrected"] / row["predicted"] for name, row in rows.items()}
    assert rows["0"]["measured_drop"] is not None and factor["0"] > 10 * max(factor["2"], factor["4"])
    assert result.file_bytes is not None and result.file_bytes <= result.budget_bytes  # type: ignore[operator]


BAD_ARGUMENTS: list[tuple[str, dict[str, Any], type[Exception], tuple[str, ...]]] = [
    ("budget_dict", {"budget": {"size": 0.5}}, TypeError, ("budget", "{'size': 0.5}")),
    ("bound_without_metric", {"max_metric_drop": 0.01}, ValueError, ("max_metric_drop", "0.01", "metric_fn")),
    ("bound_negative", {"max_metric_drop": -1.0, "metric_fn": len}, ValueError, ("max_metric_drop", "-1.0")),
    ("metric_not_callable", {"metric_fn": 3}, TypeError, ("metric_fn", "3")),
    ("loss_not_callable", {"loss_fn": "ce"}, TypeError, ("loss_fn", "'ce'")),
    ("forward_not_callable", {"forward": 1}, TypeError, ("forward", "1")),
    ("calibration_unknown", {"calibration": "l2"}, ValueError, ("calibration", "'l2'")),
    ("batches_zero", {"calibration_batches": 0}, ValueError, ("calibration_batches", "0")),
    ("corrections_float", {"corrections": 1.5}, TypeError, ("corrections", "1.5")),
    ("data_tensor", {"calibration_data": torch.zeros(3, 64)}, TypeError, ("calibration_data", "Tensor")),
    ("data_empty", {"calibration_data": []}, ValueError, ("calibration_data", "no batch")),
    ("data_nan", {"calibration_data": [torch.full((2, 64), float("nan"))]}, ValueError, ("calibration_data", "NaN")),
    ("data_wrong_shape", {"calibration_data": [torch.zeros(2, 10)]}, ValueError, ("calibration_data", "(2, 10)")),
]


@pytest.mark.parametrize(("kwargs", "error", "texts"), [c[1:] for c in BAD_ARGUMENTS],
                         ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_before_any_change(digits: Digits, kwargs: dict[str, Any],
                                                     error: type[Exception], texts: tuple[str, ...]) -> None:
    model = copy.deepcopy(digits.model)
    before = _weights(model)
    arguments: dict[str, Any] = {"budget": Budget(size=0.2), "calibration_data": digits.train, **kwargs}
    with pytest.raises(error) as info:
        compress(model, **arguments)
    for text in texts:
        assert text in str(info.value), (text, str(info.value))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_onnx_takes_the_compressed_model(digits: Digits, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from lightning_compress import export_onnx

    model = copy.deepcopy(digits.model)
    result = compress(model, Budget(size=0.2), digits.train)
    report = export_onnx(model, tmp_path / "m.onnx", digits.test[0][:2])
    text = str(report)
    assert "compress()" in text and all(f"{name}:" in text for name in LINEARS)
    assert {row["bits"] for row in result.plan} <= {2, 3, 4, 6, 8}


@pytest.mark.parametrize("size", ["25MB", 0.2])
def test_result_save_writes_the_measured_file_and_load_compressed_reads_it_back(digits: Digits, tmp_path: Path,
                                                                                size: Any) -> None:
    """A budget above the fp32 file keeps every layer float: no codes, so the file is the float export, measured as
    ``file_bytes`` (it was None, and the README's save_quantized raised); a smaller budget is written with its
    codes. Either way ``result.save`` writes exactly ``file_bytes`` and ``load_compressed`` gives the same outputs."""
    model = copy.deepcopy(digits.model)
    result = compress(model, Budget(size=size), digits.train)
    path = result.save(tmp_path / "m.safetensors")
    assert path.stat().st_size == result.file_bytes <= result.budget_bytes  # type: ignore[operator]
    all_float = all(row["label"] == "float" for row in result.plan)
    assert all_float == (size == "25MB") and (carried(model) is None) == all_float
    reloaded = load_compressed(copy.deepcopy(digits.model), path)
    assert torch.equal(reloaded(digits.test[0]), model(digits.test[0]))


def test_result_save_refuses_a_run_id_that_pushes_the_file_over_the_cap(digits: Digits, tmp_path: Path) -> None:
    """The run_id goes into the header: one longer than the generated id file_bytes was measured with grows the
    file; save() measured nothing and wrote it over the cap (review 10 E). A file already at the path stays."""
    model = copy.deepcopy(digits.model)
    result = compress(model, Budget(size=0.15), digits.train)
    assert result.file_bytes is not None and result.budget_bytes is not None
    spare = result.budget_bytes - result.file_bytes
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"the user's file")
    long = "run-" + "x" * (32 + spare + 16)  # over the cap by more than the header's 8-byte padding
    with pytest.raises(BudgetError, match=rf"`run_id`='run-x+' \({len(long)} characters\).*{result.budget_bytes} "
                                          r"bytes.*nothing was written") as info:
        result.save(path, run_id=long)
    assert info.value.smallest is not None and info.value.smallest[0] > result.budget_bytes  # as measured
    assert path.read_bytes() == b"the user's file"
    assert not [p for p in tmp_path.iterdir() if p != path]  # nothing staged beside it
    short = "r" * 32  # the generated id's width: the file as measured
    assert result.save(path, run_id=short).stat().st_size == result.file_bytes <= result.budget_bytes
