"""The trained activation ranges of ``QuantizationAwareTraining(activations="int8")`` travel in the quantized
safetensors export (metadata field ``"activations"``), so ``load_quantized`` + ``export_onnx(activations="static")``
of the file alone write the trained ranges: the same static graph, the same outputs, as the model in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lightning_compress import QuantizationAwareTraining, export_onnx, load_quantized
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import SmallCNN
from lightning_compress.quantization.carried import carried
from tests.helpers import quiet_trainer, report_of

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

LAYERS = ("net.0", "net.4", "net.9", "net.11")


def _cnn() -> SmallCNN:
    return SmallCNN(image_size=8, channels=[8, 16], hidden=32, lr=3e-3)


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _quantize_linear_params(path) -> list[tuple[float, int]]:
    graph = onnx.load(path).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    return sorted((float(inits[n.input[1]].reshape(())), int(inits[n.input[2]].reshape(())))
                  for n in graph.node if n.op_type == "QuantizeLinear")


def test_load_quantized_of_the_export_alone_gives_the_static_export_the_trained_ranges(tmp_path) -> None:
    torch.manual_seed(3)
    qat = QuantizationAwareTraining(bits=4, start=1, activations="int8", export_path="model.safetensors")
    trainer = quiet_trainer([qat], max_epochs=2)
    model = _cnn()
    trainer.fit(model, DigitsDataModule(batch_size=64))
    trained = carried(model)
    assert trained is not None and set(trained.activations) == {f"{n}.weight" for n in LAYERS}
    export = report_of(trainer).files["quantized"]
    with safe_open(export, framework="pt") as handle:
        field = json.loads((handle.metadata() or {})["lightning_compress"])["activations"]
    assert field["version"] == 1 and {k: tuple(v) for k, v in field["ranges"].items()} == trained.activations

    loaded = load_quantized(_cnn(), export)
    record = carried(loaded)
    assert record is not None and record.activations == trained.activations  # exactly, float for float

    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    x = torch.cat([batch[0] for batch in data.val_dataloader()])
    export_onnx(model.eval(), tmp_path / "memory.onnx", x[:8], activations="static")
    export_onnx(loaded.eval(), tmp_path / "file.onnx", x[:8], activations="static")  # no calibration data
    written = _quantize_linear_params(tmp_path / "file.onnx")
    assert written == _quantize_linear_params(tmp_path / "memory.onnx")
    assert written and set(written) <= {(float(np.float32(s)), z) for s, z in trained.activations.values()}
    assert np.array_equal(_ort(tmp_path / "file.onnx", x), _ort(tmp_path / "memory.onnx", x))
