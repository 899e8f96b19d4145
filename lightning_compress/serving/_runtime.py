"""What ONNX Runtime makes of an exported graph: calibration ranges, the operators it really runs after its graph
optimizations, and how close its outputs are to the in-memory model's. No Lightning."""

from __future__ import annotations

import copy
import importlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

_INSTALL = "pip install 'lightning-compress[onnx]'"
INTEGER_OPS = frozenset({
    "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "NhwcQLinearConv", "QAttention", "DynamicQuantizeLSTM",
})


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or an ImportError saying how to install them."""
    try:
        onnx = importlib.import_module("onnx")
        ort = importlib.import_module("onnxruntime")
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs `onnx` and `onnxruntime` ({err}); install them with `{_INSTALL}`"
        ) from None
    return onnx, ort


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def input_batches(data: Tensor | Iterable[Any]) -> list[Tensor]:
    if isinstance(data, Tensor):
        return list(data.split(64))
    batches = []
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise TypeError(f"`calibration_data` must yield tensors or (inputs, ...) batches, got {type(x).__name__}")
        batches.append(x)
    if not batches:
        raise ValueError("`calibration_data` is empty")
    return batches


def session(model: bytes | str | os.PathLike[str], ort: Any, optimized: str | None = None, threads: int = 1) -> Any:
    """A CPU ``InferenceSession`` (default graph optimizations), optionally saving the optimized graph."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # no NCHWc serialisation warning
    if optimized is not None:
        options.optimized_model_filepath = optimized
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def calibrate(
    float_bytes: bytes, tensors: list[str], batches: list[Tensor], onnx: Any, ort: Any
) -> dict[str, tuple[float, float]]:
    """Min / max of each named tensor of the float graph over ``batches``."""
    model = onnx.load_from_string(float_bytes)
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    calibration = session(model.SerializeToString(), ort)
    ranges: dict[str, list[float]] = {name: [np.inf, -np.inf] for name in tensors}
    for x in batches:
        values = calibration.run(tensors, {"input": x.detach().float().cpu().numpy()})
        for name, value in zip(tensors, values):
            ranges[name][0] = min(ranges[name][0], float(value.min()))
            ranges[name][1] = max(ranges[name][1], float(value.max()))
    return {name: (lo, hi) for name, (lo, hi) in ranges.items()}



def check_runtime_ops(layers: Mapping[str, Any], path: Path, onnx: Any, ort: Any) -> None:
    """Which operator reads each layer's codes once ORT has optimized the graph (what it really runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        session(path, ort, optimized)
        graph = onnx.load(optimized, load_external_data=False).graph
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    for layer in layers.values():
        if not layer.codes:
            layer.runtime_op = None
            continue
        ops = readers.get(layer.codes, [])
        integer = [op for op in ops if op in INTEGER_OPS]
        layer.runtime_op = integer[0] if integer else (ops[0] if ops else "constant-folded to float")
        if not integer:
            runs = f"ORT runs {layer.runtime_op} on it after optimization (no integer kernel)"
            layer.reason = f"{layer.reason}; {runs}" if layer.reason else runs


@torch.no_grad()
def check_outputs(model: nn.Module, path: Path, inputs: list[Tensor], ort: Any) -> tuple[float, float, int]:
    """(max abs difference, argmax agreement, samples) of ORT's outputs vs ``model``'s on ``inputs``."""
    reference = copy.deepcopy(model).cpu().eval()
    ort_session = session(path, ort)
    diff, agree, total, classified = 0.0, 0, 0, 0
    for x in inputs:
        expected = reference(x.detach().cpu()).float().numpy()
        got = ort_session.run(["output"], {"input": x.detach().float().cpu().numpy()})[0]
        diff = max(diff, float(np.abs(got - expected).max()))
        if expected.ndim == 2 and expected.shape[1] > 1:
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
            classified += expected.shape[0]
        total += expected.shape[0]
    return diff, agree / classified if classified else float("nan"), total
