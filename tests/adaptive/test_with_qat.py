"""adaptive/with_qat.py without a Trainer: the plan-only run leaves the model as it was, the plan's rows become QAT's
specs, the arguments the budget decides, and the check of the trained codes (tables)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress.adaptive.compress import CompressionResult
from lightning_compress.adaptive.with_qat import (
    PLANNED_FLOAT,
    BudgetPlan,
    decided_twice,
    layer_plan,
    planned_only,
    refusal,
)
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.core.gate import MetricGate
from lightning_compress.quantization.carried import attach, carried
from lightning_compress.quantization.primitives import QuantSpec, quantize_tensor


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _row(layer: str, bits: int, granularity: str | None, group: int | None = None) -> dict[str, Any]:
    return {"layer": layer, "bits": bits, "granularity": granularity, "group_size": group, "sparsity": 0.0}


@pytest.mark.parametrize("fails", [False, True])
def test_planned_only_puts_the_weights_back_and_carries_no_codes(fails: bool) -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def plan() -> CompressionResult:  # what compress() does: codes written into the weights, carried
        qtensor = quantize_tensor(net[0].weight.detach(), QuantSpec(2, "per_channel"))
        with torch.no_grad():
            net[0].weight.copy_(qtensor.dequantize())
        attach(net, {"0.weight": qtensor}, "compress()")
        if fails:
            raise RuntimeError("planning failed")
        return CompressionResult(net, [], None, None, None, None)

    if fails:
        with pytest.raises(RuntimeError, match="planning failed"):
            planned_only(net, plan)
    else:
        assert planned_only(net, plan).model is net
    assert carried(net) is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_layer_plan_takes_each_row_s_width_and_granularity_and_leaves_float_rows_out() -> None:
    net = _net()
    plan = layer_plan(net, [_row("0", 3, "per_group", 4), _row("2", FLOAT_BITS, None)], "mse")
    assert list(plan.layers) == ["0"] and plan.layers["0"] is net[0]
    assert plan.specs["0"] == QuantSpec(3, "per_group", 4, True, "mse")
    assert plan.skipped == {"2": PLANNED_FLOAT}
    plan = layer_plan(net, [_row("0", 8, "per_channel"), _row("2", 2, "per_channel")], "mse")
    assert plan.bits == {"0": 8, "2": 2} and all(s.symmetric for s in plan.specs.values())


def test_the_budget_plan_round_trips_through_plain_state() -> None:
    plan = BudgetPlan([_row("0", 4, "per_channel")], 1000, None, 0.9, ["plan: 1 layer"], 2, 90)
    state = plan.state()
    assert all(isinstance(v, (list, int, float, type(None))) for v in state.values())
    assert BudgetPlan.from_state(state) == plan


DEFAULTS = {"bits": 4, "granularity": "per_channel", "group_size": 128, "bits_overrides": None, "export_path": None,
            "max_metric_drop": None, "activations": None}
GIVEN: list[tuple[str, dict[str, Any], list[str]]] = [
    ("defaults", dict(DEFAULTS), []),
    ("empty_overrides", {**DEFAULTS, "bits_overrides": {}}, []),
    ("bits", {**DEFAULTS, "bits": 3}, ["`bits`=3"]),
    ("grain_and_export", {**DEFAULTS, "granularity": "per_group", "export_path": "q.safetensors"},
     ["`granularity`='per_group'", "`export_path`='q.safetensors'"]),
    ("bound", {**DEFAULTS, "max_metric_drop": 0.0}, ["`max_metric_drop`=0.0"]),
    ("activations", {**DEFAULTS, "activations": "int8"}, ["`activations`='int8'"]),
]


@pytest.mark.parametrize(("given", "expected"), [g[1:] for g in GIVEN], ids=[g[0] for g in GIVEN])
def test_decided_twice_names_what_the_budget_decides(given: dict[str, Any], expected: list[str]) -> None:
    assert decided_twice(given, DEFAULTS) == expected


GATE = MetricGate(0.05)
# id, file bytes, size cap, MACs, MACs cap, metric after (reference 0.9), refused because of (None: delivered)
CHECKS: list[tuple[str, int | None, int | None, int | None, int | None, float, str | None]] = [
    ("within", 1000, 1000, 50, 60, 0.86, None),
    ("no_caps", 5000, None, 500, None, 0.9, None),
    ("one_byte_over", 1001, 1000, 50, 60, 0.9, "1001 B > the cap 1000 B"),
    ("macs_over", 900, 1000, 61, 60, 0.9, "61 MACs per example > the cap 60"),
    ("bound", 900, 1000, 50, 60, 0.84, "dropped by 0.06"),
    ("not_finite", 900, 1000, 50, 60, float("nan"), "not finite"),
]


@pytest.mark.parametrize(("size", "size_cap", "macs", "macs_cap", "after", "why"), [c[1:] for c in CHECKS],
                         ids=[c[0] for c in CHECKS])
def test_refusal_of_the_trained_codes(size: int | None, size_cap: int | None, macs: int | None,
                                      macs_cap: int | None, after: float, why: str | None) -> None:
    reason = refusal(size, size_cap, macs, macs_cap, GATE.judge(0.9, after))
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason
