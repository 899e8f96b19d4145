"""export_onnx(activations="static") with trained activation ranges carried by the model (serving/_trained.py):
written as they are, no calibration needed when they cover every quantized tensor, refusals before any file.
Random tensors: shape / graph checks only (the accuracy checks on digits are in
tests/callbacks/test_qat_activations.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress import export_onnx, quantize
from lightning_compress.quantization.carried import carried

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    quantize(model, bits=8)
    return model


class _TwoHeads(nn.Module):
    """Two quantized layers reading the same tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _quantize_linear_scales(path: Path) -> list[tuple[float, int]]:
    graph = onnx.load(path).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    return [(float(inits[n.input[1]].reshape(())), int(inits[n.input[2]].reshape(())))
            for n in graph.node if n.op_type == "QuantizeLinear"]


def test_trained_ranges_are_written_as_they_are_without_calibration_data(tmp_path: Path) -> None:
    model = _mlp()
    record = carried(model)
    assert record is not None
    record.activations.update({"0.weight": (0.02, 128), "2.weight": (0.01, 0)})
    report = export_onnx(model, tmp_path / "m.onnx", torch.randn(8, 16), activations="static")
    assert {layer.runtime_op for layer in report.layers.values()} == {"QGemm"}
    expected = {(float(np.float32(0.02)), 128), (float(np.float32(0.01)), 0)}
    assert set(_quantize_linear_scales(tmp_path / "m.onnx")) == expected


def test_without_trained_ranges_static_still_needs_calibration_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`activations`='static' needs `calibration_data`"):
        export_onnx(_mlp(), tmp_path / "m.onnx", torch.randn(8, 16), activations="static")
    assert not (tmp_path / "m.onnx").exists()


def test_ranges_that_leave_a_tensor_uncovered_ask_for_calibration_data(tmp_path: Path) -> None:
    model = _mlp()
    record = carried(model)
    assert record is not None
    record.activations["2.weight"] = (0.01, 0)  # the first layer's input has no trained range
    with pytest.raises(ValueError, match="`calibration_data` is needed: the trained activation ranges leave"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(8, 16), activations="static")
    assert not (tmp_path / "m.onnx").exists()
    report = export_onnx(model, tmp_path / "m.onnx", torch.randn(8, 16), activations="static",
                         calibration_data=torch.randn(64, 16))  # calibrated for what is left
    assert (float(np.float32(0.01)), 0) in _quantize_linear_scales(report.path)


def test_one_tensor_trained_with_two_ranges_is_refused_before_writing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    quantize(model, bits=8)
    record = carried(model)
    assert record is not None
    record.activations.update({"a.weight": (0.02, 128), "b.weight": (0.03, 128)})
    with pytest.raises(ValueError, match=r"read the same tensor .* different input ranges"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(8, 16), activations="static")
    assert not (tmp_path / "m.onnx").exists()
    record.activations["b.weight"] = (0.02, 128)  # one range: fine (the heads' outputs, before the Add, calibrated)
    export_onnx(model, tmp_path / "m.onnx", torch.randn(8, 16), activations="static",
                calibration_data=torch.randn(64, 16))
    assert _quantize_linear_scales(tmp_path / "m.onnx").count((float(np.float32(0.02)), 128)) == 1


def test_dynamic_export_ignores_trained_ranges(tmp_path: Path) -> None:
    model = _mlp()
    record = carried(model)
    assert record is not None
    record.activations.update({"0.weight": (0.02, 128), "2.weight": (0.01, 0)})
    export_onnx(model, tmp_path / "m.onnx", torch.randn(8, 16), activations="dynamic")
    assert _quantize_linear_scales(tmp_path / "m.onnx") == []
