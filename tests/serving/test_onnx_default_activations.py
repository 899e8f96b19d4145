"""export_onnx's default ``activations`` (serving/onnx.py): ``"static"`` for a model carrying uint8 input ranges
(QAT's trained ones, a latency plan's calibrated ones: it was trained or judged with them, and that graph is the one
to serve), ``"dynamic"`` otherwise; an explicit choice is kept. Random tensors: graph checks only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_compress import export_onnx, quantize
from lightning_compress.quantization.carried import carried

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _mlp(ranges: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    quantize(model, bits=8)
    record = carried(model)
    assert record is not None
    if ranges:  # inputs in [-4, 4) and the ReLU's output in [0, 8]: every quantized tensor covered
        record.activations.update({"0.weight": (8 / 255, 128), "2.weight": (8 / 255, 0)})
    return model


@pytest.mark.parametrize(("ranges", "given", "expected", "op"), [
    (False, None, "dynamic", "MatMulInteger"),
    (True, None, "static", "QGemm"),
    (True, "dynamic", "dynamic", "MatMulInteger"),
])
def test_the_default_follows_the_ranges_the_model_carries(tmp_path: Path, ranges: bool, given: str | None,
                                                          expected: str, op: str) -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    report = export_onnx(_mlp(ranges), tmp_path / "m.onnx", x, activations=given)  # no calibration data
    assert report.activations == expected
    assert any(op in (layer.op, layer.runtime_op) for layer in report.layers.values()), report
