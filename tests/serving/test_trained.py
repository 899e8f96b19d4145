"""export_onnx(activations="static") with trained activation ranges carried by the model (serving/_trained.py):
written as they are, no calibration needed when they cover every quantized tensor, refusals before any file; one
tensor read by layers trained with different ranges takes their union.
Random tensors: shape / graph checks only (the accuracy checks on digits are in
tests/callbacks/test_qat_activations.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress import export_onnx, quantize
from lightning_compress.quantization.carried import carried
from lightning_compress.serving._trained import union

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


def test_one_tensor_trained_with_two_ranges_takes_their_union(tmp_path: Path) -> None:
    """A static graph has one range per tensor: two layers trained with different ranges on one input share the
    union of both (warned, naming them); the export's own output check compares ORT with the reference
    fake-quantized with that union."""
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    quantize(model, bits=8)
    record = carried(model)
    assert record is not None
    record.activations.update({"a.weight": (0.02, 200), "b.weight": (0.03, 50)})  # [-4.0, 1.1] and [-1.5, 6.15]
    with pytest.warns(UserWarning, match=r"layers \['a', 'b'\] read the same tensor .* different trained input "
                                         r"ranges .* their union"):
        report = export_onnx(model, tmp_path / "m.onnx", torch.randn(8, 16), activations="static",
                             calibration_data=torch.randn(64, 16))  # the heads' outputs, before the Add
    scale, zero_point = union([(0.02, 200), (0.03, 50)])
    half = scale / 2  # the integer zero point moves the grid by up to half a step, as ORT's own MinMax does
    assert -zero_point * scale <= -4.0 + half and (255 - zero_point) * scale >= 6.15 - half  # covers both
    assert _quantize_linear_scales(tmp_path / "m.onnx").count((scale, zero_point)) == 1
    assert (float(np.float32(0.02)), 200) not in _quantize_linear_scales(tmp_path / "m.onnx")
    assert report.argmax_agreement is not None and report.argmax_agreement >= 0.9
    record.activations["b.weight"] = (0.02, 200)  # one range: written as it is, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export_onnx(model, tmp_path / "m.onnx", torch.randn(8, 16), activations="static",
                    calibration_data=torch.randn(64, 16))
    assert _quantize_linear_scales(tmp_path / "m.onnx").count((float(np.float32(0.02)), 200)) == 1


class _Attention(nn.Module):
    """One self-attention block with separate query / key / value projections (Hugging Face style): three
    quantized layers reading one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 16)
        weights = torch.softmax(self.query(x) @ self.key(x).transpose(1, 2) / 4.0, dim=-1)  # (B, T, T)
        return self.out(weights @ self.value(x))


def test_attention_with_different_trained_query_key_value_ranges_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Attention().eval()
    quantize(model, bits=8)
    record = carried(model)
    assert record is not None
    ranges = {"query.weight": (0.02, 120), "key.weight": (0.025, 128), "value.weight": (0.018, 140)}
    record.activations.update({**ranges, "out.weight": (0.01, 128)})
    x = torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match=r"\['(query|key|value)', '(query|key|value)', '(query|key|value)'\] read "
                                         r"the same tensor"):
        report = export_onnx(model, tmp_path / "m.onnx", x, activations="static",
                             calibration_data=torch.randn(16, 5, 16))
    written = _quantize_linear_scales(tmp_path / "m.onnx")
    assert written.count(union(list(ranges.values()))) == 1  # the shared input: one QDQ, the union
    with torch.no_grad():
        largest = float(model(x).abs().max())
    assert report.max_abs_diff is not None and report.max_abs_diff < 0.05 * largest  # vs the union-quantized model


def test_dynamic_export_ignores_trained_ranges(tmp_path: Path) -> None:
    model = _mlp()
    record = carried(model)
    assert record is not None
    record.activations.update({"0.weight": (0.02, 128), "2.weight": (0.01, 0)})
    export_onnx(model, tmp_path / "m.onnx", torch.randn(8, 16), activations="dynamic")
    assert _quantize_linear_scales(tmp_path / "m.onnx") == []
