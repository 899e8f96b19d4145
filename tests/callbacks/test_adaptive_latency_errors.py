"""Review 10 of ``AdaptiveCompression``'s latency + caps end (callbacks/adaptive_latency.py), in small digits fits with
stand-in timings (``stand_in_timings``; no speed is asserted): the delivered model is timed as the graph
``export_onnx(model)`` writes for it, and widths whose graph misses the latency go to the int8 path (refused when that
cannot hold either); any error after the units (not only a refusal) leaves a FAILED report and the compacted
floats, no codes carried; a latency + MACs budget whose only miss after the units is MACs ends with a BudgetError,
not a ZeroDivisionError, and one below what whole units can reach is refused in setup."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import onnx
import pytest
import torch

from lightning_compress import AdaptiveCompression, Budget, export_onnx
from lightning_compress.adaptive import in_fit_units, latency
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.callbacks import adaptive_latency
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.quantization.carried import carried
from tests.adaptive.ddp_latency_gate import stand_in_seconds, stand_in_timings
from tests.adaptive.test_in_fit_units import LATENCY, SHAPE, _model

WEIGHT_ONLY = {"DynamicQuantizeLinear", "ConvInteger", "MatMulNBits", "MatMulInteger"}  # export_onnx's dynamic ops


def _ops(graph: bytes) -> set[str]:
    return {node.op_type for node in onnx.load_from_string(graph).graph.node}


def _callback(budget: Budget | None = None) -> AdaptiveCompression:
    return AdaptiveCompression(budget=budget or Budget(latency=LATENCY, latency_input=SHAPE, size=0.1, macs=0.6),
                               start_step=20, end_step=120, frequency=20, export_path="model.budget.safetensors",
                               max_metric_drop=0.05)


def _refused(callback: AdaptiveCompression, root: Path, error: type[Exception], match: str
             ) -> tuple[torch.nn.Module, Any]:
    """The fit of ``_model()`` (as ``_fit`` runs it) ending with ``error``: the model and the error."""
    model = _model()
    with pytest.raises(error, match=match) as info:
        _trainer(callback, root).fit(model, datamodule=DigitsDataModule())
    return model, info.value


def _trainer(callback: AdaptiveCompression, root: Path, epochs: int = 10) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(root),
                      num_sanity_val_steps=0, deterministic=True, callbacks=[callback])


def _refused_with_floats(callback: AdaptiveCompression, model: torch.nn.Module, root: Path, error: str) -> None:
    """The FAILED report, the compacted floats back (no codes carried) and no model file written."""
    assert callback.report.failure is not None and callback.report.failure.startswith(error)
    assert carried(model) is None
    state = callback.float_copy.state  # the compacted floats, taken before any code
    assert state and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not list(root.rglob("*.safetensors"))


def _slow_dynamic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in timings where the weight-only graph ``export_onnx`` writes for a widths plan
    (``DynamicQuantizeLinear`` / ``ConvInteger`` / ``MatMulNBits``) takes four times the slowest graph timed beside it
    (on this box's ORT it measured several times the dense latency)."""

    def timings(graphs: Mapping[str, bytes], shapes: Mapping[str, Any], threads: int,
                **kwargs: Any) -> dict[str, float]:
        seconds = stand_in_seconds(graphs, shapes, threads, **kwargs)
        slowest = max(seconds.values())
        return {k: 4 * slowest if WEIGHT_ONLY & _ops(graphs[k]) else s for k, s in seconds.items()}

    stand_in_timings(monkeypatch)
    for module in (latency, in_fit_units):
        monkeypatch.setattr(module, "measure", timings)


def test_widths_whose_exported_graph_misses_the_latency_go_to_the_int8_path(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The fit used to time the float graph and deliver the widths as within the latency."""
    _slow_dynamic(monkeypatch)
    callback = _callback(Budget(latency=LATENCY, latency_input=SHAPE, size=0.2, macs=0.6))
    model = _model()
    _trainer(callback, tmp_path).fit(model, datamodule=DigitsDataModule())
    entry = callback.report.gate["adaptive"]
    steps = entry["verification_steps"]
    assert any(s.startswith("then widths") for s in steps) and any("widths' graph is over" in s for s in steps)
    assert entry["then"] == "int8" and entry["delivered"]["latency"] <= LATENCY
    export_onnx(model, tmp_path / "served.onnx", torch.randn(2, 64))  # what the user serves: the graph timed
    assert not WEIGHT_ONLY & _ops((tmp_path / "served.onnx").read_bytes())


def test_widths_over_the_latency_and_an_int8_path_over_the_size_are_refused(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_dynamic(monkeypatch)
    callback = _callback()  # size=0.1: the int8 path cannot reach it
    model, _ = _refused(callback, tmp_path, BudgetError, r"cannot hold.*delivered measured 4\.000x.*widths' graph is "
                        r"over the latency")
    _refused_with_floats(callback, model, tmp_path, "LatencyBudgetError")


def test_any_error_after_the_codes_leaves_a_failed_report_and_the_compacted_floats(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export failing in the delivered model's timing, after the widths wrote their codes into the model: not a
    BudgetError, so the fit used to end with no report and the model carrying its codes."""
    stand_in_timings(monkeypatch)

    def broken(model: torch.nn.Module, *_: Any) -> bytes:
        assert carried(model) is not None  # the codes are in the fit's model by now
        raise RuntimeError("stand-in export failure")

    monkeypatch.setattr(adaptive_latency, "served_graph", broken)
    callback = _callback()
    model, _ = _refused(callback, tmp_path, RuntimeError, "stand-in export failure")
    _refused_with_floats(callback, model, tmp_path, "RuntimeError: stand-in export failure")


def test_a_macs_cap_the_units_did_not_reach_ends_with_a_budget_error(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency met by the units, MACs still over their cap: int8 lowers no MAC; the fit used to end with a
    ZeroDivisionError out of the latency plan (no report, no nearest budget)."""
    stand_in_timings(monkeypatch)
    callback = _callback(Budget(latency=LATENCY, latency_input=SHAPE, macs=0.2))
    model, error = _refused(callback, tmp_path, BudgetError, r"macs=0\.2.*cannot hold.*counts \d+ MACs per example")
    assert callback.caps is not None and callback.caps.macs_cap is not None
    assert error.smallest is not None and error.smallest[1] > callback.caps.macs_cap  # the nearest: as counted
    _refused_with_floats(callback, model, tmp_path, type(error).__name__)


def test_a_macs_cap_below_what_whole_units_reach_is_refused_before_any_step(tmp_path: Path) -> None:
    """A latency fit removes whole units only: with most MACs in the output layer (no unit of it goes), a cap above
    the unstructured floor but below the units' one used to pass setup and fail after the whole fit."""
    model = MLPClassifier(input_size=64, hidden=[32], num_classes=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = AdaptiveCompression(budget=Budget(latency=0.6, latency_input=(256, 64), macs=0.2), start_step=5,
                                   end_step=10, frequency=5)
    trainer = _trainer(callback, tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"macs=0\.2 .* is below what whole units can reach.*fewest kept"):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
