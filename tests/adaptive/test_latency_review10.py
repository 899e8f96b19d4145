"""Review 10 of the latency path (issue 23), pure half: the graph the delivered model is timed as is the one
``export_onnx(model)`` writes for it (adaptive/latency_caps.served_graph), and the latency plan's greedy survives an
int8 move that makes no progress (adaptive/latency_plan.py: a MACs cap int8 cannot lower)."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from lightning_compress import export_onnx, quantize
from lightning_compress.adaptive.latency_caps import served_graph
from lightning_compress.adaptive.latency_plan import CapCosts, LayerCost
from lightning_compress.adaptive.units import UnitCandidate
from tests.adaptive.test_in_fit_units import SHAPE, _model
from tests.adaptive.test_latency_plan import problem


def _ops(graph: bytes) -> set[str]:
    return {node.op_type for node in onnx.load_from_string(graph).graph.node}


def test_a_model_carrying_weight_only_codes_is_timed_as_the_graph_export_onnx_writes(tmp_path: Path) -> None:
    model = _model().eval()
    quantize(model, bits=4)  # codes, no input ranges: what the widths step delivers
    batches = [torch.randn(8, 64)]
    served = _ops(served_graph(model, SHAPE, batches))
    export_onnx(model, tmp_path / "user.onnx", torch.randn(2, 64))  # the call a user serves it with
    written = _ops((tmp_path / "user.onnx").read_bytes())
    assert served == written
    assert {"ConvInteger", "DynamicQuantizeLinear"} & served  # not the float graph the old code timed


def test_the_served_graph_leaves_the_global_random_stream_alone() -> None:
    """It is built on rank zero alone: drawing its example from the global stream would set the ranks apart."""
    model = _model().eval()
    quantize(model, bits=4)
    batches = [torch.randn(8, 64)]
    state = torch.random.get_rng_state()
    served_graph(model, SHAPE, batches)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_float_model_is_still_timed_as_its_float_graph() -> None:
    served = _ops(served_graph(_model().eval(), SHAPE, [torch.randn(8, 64)]))
    assert "Conv" in served and not {"ConvInteger", "QLinearConv", "MatMulNBits"} & served


def test_the_greedy_skips_an_int8_move_of_no_progress_instead_of_dividing_by_it() -> None:
    """Latency met, only MACs over: int8 changes no MAC (progress exactly 0), the units lower them."""
    p = problem(1.0)
    p.costs = CapCosts({"a": LayerCost(1, 1.0, True), "b": LayerCost(1, 1.0, False)}, dense_bytes=500, dense_macs=100)
    plan, int8 = p.solve_joint((20.0, None, 50.0))  # ZeroDivisionError before the fix
    assert int8 == frozenset() and plan["a"] == UnitCandidate("a", 4, 8, 1.0)  # the units did what they could
    assert p.resources(plan, int8)[2] > 50  # still over: the caller refuses, with a BudgetError
