"""``AdaptiveCompression`` with a latency budget and a size / MACs cap together (callbacks/adaptive_latency.py,
adaptive/latency_caps.py), in real fits on sklearn's digits with a small CNN: units removed during the fit for the
latency, then widths (the latency met) or int8 (latency left) planned on the compacted model; every cap holds on
what is delivered (the file on disk, the MACs counted, the latency measured against the dense model), the file and
the compressed checkpoint load back, and a combined budget that cannot hold is refused with the nearest one.
ONNX Runtime's timings stand in as a function of each graph's size (``stand_in_timings``), as in the other fit
tests of the latency path: real timings on a loaded 2-core box move the plan; no speed is asserted here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress import AdaptiveCompression, Budget, load_compressed, load_quantized
from lightning_compress.adaptive import latency_caps
from lightning_compress.adaptive.caps import Caps
from lightning_compress.adaptive.costs import file_bytes, model_macs
from lightning_compress.adaptive.int8_latency import quantize_int8
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.callbacks import adaptive_latency, adaptive_plan
from lightning_compress.core.accounting import state_bytes
from lightning_compress.quantization.carried import carried, forget
from tests.adaptive.ddp_latency_gate import stand_in_timings
from tests.adaptive.test_in_fit_units import LATENCY, SHAPE, _fit, _model, _test_accuracy, two_ranks

NARROWER = 0.15  # below the file of the compacted model with every layer int8 (with the fit below)
SIZE = 0.1  # of the dense model's fp32 tensors: below what the compacted float model is, so widths must be planned


def _callback(**kwargs: Any) -> AdaptiveCompression:
    budget = kwargs.pop("budget", Budget(latency=LATENCY, latency_input=SHAPE, size=SIZE, macs=0.6))
    return AdaptiveCompression(budget=budget, start_step=20, end_step=120, frequency=20,
                               export_path="model.budget.safetensors", **kwargs)


def _dense_bytes() -> int:
    return sum(state_bytes(_model()).values())


def _macs(model: torch.nn.Module) -> int:
    return model_macs(model, torch.zeros(1, 64), lambda m, b: m(b))


def _check_delivered(callback: AdaptiveCompression, model: torch.nn.Module, dense: torch.nn.Module,
                     size: float = SIZE) -> Path:
    entry = callback.report.gate["adaptive"]
    export = Path(callback.report.files["quantized"])
    assert export.stat().st_size == entry["delivered"]["file_bytes"] <= int(size * _dense_bytes())  # on disk
    assert _macs(model) <= int(0.6 * _macs(dense))  # counted on the delivered model
    timed = [s for s in entry["verification_steps"] if s.startswith("delivered measured")]
    assert timed and f"measured {entry['delivered']['latency']:.3f}x" in timed[-1]
    assert entry["delivered"]["latency"] <= LATENCY  # measured against the dense model, as the fit timed it
    assert sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)) < 32 + 64  # units gone
    reloaded = load_quantized(_model(), export)  # the file holds the compacted shapes and the codes
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    float_copy = load_compressed(_model(), callback.report.files["float_copy"])  # compacted, before the codes
    assert all(torch.equal(float_copy.state_dict()[k], v) for k, v in callback.float_copy.state.items())
    for kind in ("compressed_checkpoint", "compacted"):  # the compacted file: the delivered model, float layout
        restored = load_compressed(_model(), callback.report.files[kind])
        assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items()), kind
    return export


def test_units_meet_the_latency_and_widths_meet_the_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_timings(monkeypatch)
    callback = _callback(max_metric_drop=0.05)
    real, planned = adaptive_plan.compress, []

    def compress(model: torch.nn.Module, budget: Budget, *args: Any, **kwargs: Any) -> Any:
        planned.append((budget, callback.budget))  # the budget planned for; the callback's, never swapped
        return real(model, budget, *args, **kwargs)

    monkeypatch.setattr(adaptive_plan, "compress", compress)
    asked = callback.budget
    model, dense = _fit(callback, tmp_path)
    entry = callback.report.gate["adaptive"]
    assert entry["then"] == "widths" and entry["delivered"]["compacted_latency"] <= LATENCY
    assert len(planned) == 1 and planned[0][0].latency is None and planned[0][0].size is not None  # the caps
    assert planned[0][1] is asked and callback.budget is asked
    assert carried(model) is not None and any(row["bits"] < 32 for row in entry["plan"])  # codes, planned widths
    _check_delivered(callback, model, dense)
    assert callback.report.metric_before - callback.report.metric_after <= 0.05  # the bound, before the 1st event
    assert _test_accuracy(model) >= 0.8  # the held-out split: the fit never saw it


def test_latency_left_after_the_units_is_met_with_int8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compacted model measured over the latency (stood in: its timing inflated) leaves latency to int8 (8-bit
    codes: a size cap int8 can meet)."""
    stand_in_timings(monkeypatch)
    real = latency_caps.next_budget

    def over(budget: Budget, caps: Caps, ratio: float, macs: int | None) -> tuple[Budget, str]:
        return real(budget, caps, max(ratio, LATENCY * 1.2), macs)

    monkeypatch.setattr(adaptive_latency, "next_budget", over)
    callback = _callback(budget=Budget(latency=LATENCY, latency_input=SHAPE, size=0.2, macs=0.6))
    model, dense = _fit(callback, tmp_path)
    entry = callback.report.gate["adaptive"]
    assert entry["then"] == "int8"
    record = carried(model)
    assert record is not None and record.codes and record.activations  # int8 codes and the ranges timed with
    assert all(q.spec.bits == 8 for q in record.codes.values())
    _check_delivered(callback, model, dense, size=0.2)


def test_latency_left_and_a_size_int8_cannot_meet_end_with_int8_and_narrower_layers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, with a size below what the compacted model's int8 file needs: the fit's int8 step reaches the same
    compress() path, whose plan puts the bytes left to narrower widths (adaptive/latency_widths.py); every cap holds
    on the delivered model, the file loads back."""
    stand_in_timings(monkeypatch)
    real = latency_caps.next_budget

    def over(budget: Budget, caps: Caps, ratio: float, macs: int | None) -> tuple[Budget, str]:
        return real(budget, caps, max(ratio, LATENCY * 1.2), macs)

    monkeypatch.setattr(adaptive_latency, "next_budget", over)
    callback = _callback(budget=Budget(latency=LATENCY, latency_input=SHAPE, size=NARROWER, macs=0.6))
    model, dense = _fit(callback, tmp_path)
    entry = callback.report.gate["adaptive"]
    assert entry["then"] == "int8"
    every_int8 = copy.deepcopy(model)  # the premise: the compacted float model with every layer int8 is over
    forget(every_int8)
    every_int8.load_state_dict(callback.float_copy.state)
    quantize_int8(every_int8, [n for n, m in every_int8.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert file_bytes(every_int8) > int(NARROWER * _dense_bytes())
    record = carried(model)
    assert record is not None and record.activations  # the ranges timed with
    bits = {q.spec.bits for q in record.codes.values()}
    assert 8 in bits and min(bits) < 8, bits  # int8 layers and narrower ones in one plan
    assert min(row["bits"] for row in entry["plan"]) == min(bits)  # the plan reported names the narrower width
    _check_delivered(callback, model, dense, size=NARROWER)


def test_next_budget_passes_the_caps_on_and_leaves_the_latency_relative_to_the_compacted_model() -> None:
    budget = Budget(latency=0.5, latency_input=(4, 1, 8, 8), size=1000, macs=0.5)
    caps = Caps(size_cap=1000, macs_cap=200, fixed_bytes=0, other_macs=0, where={})
    assert latency_caps.next_budget(budget, caps, 0.45, 150) == (Budget(size=1000, macs=200), "widths")
    with pytest.raises(BudgetError, match="counts 250 MACs per example"):  # over their cap: int8 lowers none
        latency_caps.next_budget(budget, caps, 0.45, 250)
    step, how = latency_caps.next_budget(budget, caps, 0.625, 150)
    assert how == "int8" and step.latency == pytest.approx(0.8) and step.size == 1000


@pytest.mark.parametrize("budget, match", [
    (Budget(latency=0.5, latency_input=SHAPE, size=10), r"size=10 \(10 bytes\) is below the floor"),
    (Budget(latency=0.5, latency_input=(2, 5, 7), size=0.2), "latency_input"),
])
def test_bad_combined_budgets_are_refused_before_any_step(tmp_path: Path, budget: Budget, match: str) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        _fit(AdaptiveCompression(budget=budget, start_step=5, end_step=10), tmp_path, epochs=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_combined_budget_that_cannot_hold_is_refused_with_the_nearest_one(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_timings(monkeypatch)
    callback = _callback(budget=Budget(latency=LATENCY, latency_input=SHAPE, size=0.05), max_metric_drop=0.0)
    with pytest.raises(BudgetError, match=r"budget`=Budget\(size=0\.05.*cannot hold.*smallest") as info:
        _fit(callback, tmp_path)
    assert info.value.smallest is not None and info.value.smallest[0] > int(0.05 * _dense_bytes())  # the nearest
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing over the budget was written, not even compacted
    assert "compacted" not in callback.report.files


@pytest.mark.ddp
def test_ddp_ranks_deliver_the_same_int8_plan_on_rank_zeros_timings(tmp_path: Path) -> None:
    """strategy="ddp" (a script; Lightning starts rank 1), the int8 step after the units: every timing is rank
    zero's (rank 1's stand-in timings are offset), so both ranks record the same plan, delivered figures, codes,
    input ranges and weights."""
    ranks = two_ranks(Path(__file__).with_name("ddp_latency_caps.py"), tmp_path, "int8")
    assert ranks[0] == ranks[1]
    assert ranks[0]["then"] == "int8" and ranks[0]["codes"] and ranks[0]["ranges"]
    assert ranks[0]["delivered"]["latency"] <= LATENCY
