"""Narrower widths inside a latency plan (adaptive/latency_widths.py): which widths a layer may take (those the
export serves on the operator its latency row timed), checked against what ``export_onnx`` really writes, and a
latency + size budget that int8 alone cannot meet held by a plan with int8 and narrower layers, on the file on disk,
the MACs counted and the latency measured; the file loads back and exports. ORT's timings stand in as each graph's
size (``stand_in_timings``): no speed is asserted."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress import load_compressed, load_quantized
from lightning_compress.adaptive import Budget, compress, latency_budget
from lightning_compress.adaptive.candidates import Candidate
from lightning_compress.adaptive.costs import model_macs
from lightning_compress.adaptive.int8_latency import as_served
from lightning_compress.adaptive.latency_budget import LatencyBudgetError
from lightning_compress.adaptive.latency_widths import Widths, apply_widths, served
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.quantization.calibration import feed
from lightning_compress.quantization.carried import carried
from lightning_compress.serving.onnx import export_onnx
from tests.adaptive.ddp_latency_gate import stand_in_timings
from tests.adaptive.test_latency_budget import SHAPE, accuracy, trained_cnn

CONV, LINEAR = nn.Conv2d(32, 64, 3), nn.Linear(256, 128)


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    return trained_cnn()


def _candidate(bits: int, granularity: str | None, group: int | None = None) -> Candidate:
    return Candidate("layer", bits, granularity, group, 0.0, 0, 0, 0.0)


@pytest.mark.parametrize(("module", "int8", "bits", "granularity", "group", "allowed"), [
    (CONV, True, 8, "per_channel", None, True),
    (CONV, True, 2, "per_channel", None, True),  # the same QLinearConv, smaller codes
    (CONV, True, 4, "per_group", 32, False),  # no int8 form: DequantizeLinear, float kernel
    (CONV, True, FLOAT_BITS, None, None, False),  # the latency plan timed it int8
    (CONV, False, 4, "per_channel", None, False),  # a lone QLinearConv between float layers
    (CONV, False, 4, "per_group", 32, False),
    (CONV, False, FLOAT_BITS, None, None, True),
    (LINEAR, True, 6, "per_channel", None, True),  # QGemm
    (LINEAR, True, 4, "per_channel", None, False),  # MatMulNBits, not the QGemm timed
    (LINEAR, False, 4, "per_channel", None, True),  # weight-only MatMulNBits
    (LINEAR, False, 6, "per_channel", None, False),  # QGemm: int8 activations the plan did not time
    (LINEAR, False, 6, "per_group", 32, True),  # MatMulNBits, 8-bit blocks
    (LINEAR, False, FLOAT_BITS, None, None, True),
])
def test_served_widths_follow_the_operator_the_latency_row_timed(module: nn.Module, int8: bool, bits: int,
                                                                 granularity: str | None, group: int | None,
                                                                 allowed: bool) -> None:
    assert served(_candidate(bits, granularity, group), module, int8) is allowed


def test_the_export_serves_the_allowed_widths_as_the_table_assumes(digits: dict[str, Any], tmp_path: Path) -> None:
    """What served() relies on, checked on the installed export / ORT: narrower per-channel conv codes stay on
    QLinearConv with the int8 layers, a float-left Linear's 4-bit and per-group codes go to MatMulNBits."""
    model = copy.deepcopy(digits["model"]).eval()
    conv = _candidate(3, "per_channel")
    plan = {"0": _candidate(8, "per_channel"), "4": conv, "9": _candidate(4, "per_group", 32),
            "11": _candidate(4, "per_channel")}
    apply_widths(model, Widths({n: replace(c, layer=n) for n, c in plan.items()}, 0.0))
    record = carried(model)
    assert record is not None and {k: q.spec.bits for k, q in record.codes.items()} == \
        {"0.weight": 8, "4.weight": 3, "9.weight": 4, "11.weight": 4}
    report = export_onnx(model, tmp_path / "mixed.onnx", digits["batches"][0][0][:2], activations="static",
                         calibration_data=[digits["batches"][0][0]])
    ops = {name: layer.op for name, layer in report.layers.items()}
    assert ops == {"0": "QLinearConv", "4": "QLinearConv", "9": "MatMulNBits", "11": "MatMulNBits"}, ops


def test_a_latency_and_size_int8_cannot_meet_holds_with_int8_and_narrower_layers(
        digits: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``search="bits"`` (int8 only, no units: what the fit's end calls on its compacted model): at 0.2 of the fp32
    file the all-int8 plan is over the cap. Without the widths it was refused; with them every cap holds."""
    stand_in_timings(monkeypatch)
    model = digits["model"]
    budget = Budget(latency=0.5, size=0.2, latency_input=SHAPE)
    with monkeypatch.context() as before:
        before.setattr(latency_budget, "plan_widths", lambda *args: None)  # the path before the widths
        with pytest.raises(LatencyBudgetError, match="no plan meets it"):
            compress(model, budget, digits["batches"][:4], search="bits")
    result = compress(model, budget, digits["batches"][:4], search="bits",
                      metric_fn=lambda m: accuracy(m, digits["val"]), max_metric_drop=0.02)
    bits = {key.rpartition(".")[0]: q.spec.bits for key, q in carried(result.model).codes.items()}  # type: ignore
    assert 8 in bits.values() and min(bits.values()) < 8, bits  # int8 layers and narrower ones, one plan
    assert {row["layer"]: row["bits"] for row in result.plan if row["bits"] < FLOAT_BITS}.items() <= bits.items()
    assert any("widths {" in step for step in result.steps), result.steps
    path = result.save(tmp_path / "delivered.safetensors")  # the file on disk
    assert path.stat().st_size == result.file_bytes <= result.budget_bytes
    assert result.latency is not None and result.latency <= 0.5  # as measured (stood in)
    assert model_macs(result.model, digits["batches"][0], feed) == result.macs
    with as_served(result.model):
        assert result.metric_after == pytest.approx(accuracy(result.model, digits["val"]))
    assert result.metric_before - result.metric_after <= 0.02  # type: ignore[operator]
    for load in (load_quantized, load_compressed):  # the file round trip, codes and input ranges included
        loaded = load(copy.deepcopy(model), path)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in result.model.state_dict().items())
        served_report = export_onnx(loaded, tmp_path / "loaded.onnx", digits["batches"][0][0][:2])
        assert served_report.activations == "static" and not served_report.not_integer


def test_a_widths_plan_the_bound_refuses_leaves_the_plan_without_widths_to_be_judged(
        digits: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The Fisher can price narrow codes below removed units where the metric says otherwise: when the plan with
    widths fails the bound, the next passing plans measured at the same budget are judged, up to the one without
    widths (the metric here refuses any narrower code, so only that plan can pass)."""
    stand_in_timings(monkeypatch)

    def narrow_refused(model: nn.Module) -> float:
        record = carried(model)
        return 0.0 if record is not None and any(q.spec.bits < 8 for q in record.codes.values()) else 1.0

    result = compress(digits["model"], Budget(latency=0.5, size=0.25, latency_input=SHAPE), digits["batches"][:4],
                      metric_fn=narrow_refused, max_metric_drop=0.5)
    judged = [step for step in result.steps if step.startswith("metric ")]
    assert len(judged) >= 2 and all(step.endswith("of the plan with widths") and step.startswith("metric 0 ")
                                    for step in judged[:-1])
    assert judged[-1].endswith("of the plan without widths") and result.metric_after == 1.0
    assert result.budget_latency == 0.5 and result.latency is not None and result.latency <= 0.5
    assert result.file_bytes is not None and result.budget_bytes is not None
    assert result.file_bytes <= result.budget_bytes
    assert all(q.spec.bits == 8 for q in carried(result.model).codes.values())  # type: ignore[union-attr]
