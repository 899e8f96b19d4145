"""What ONNX Runtime makes of an exported graph: calibration ranges, the operators it really runs after its graph
optimizations, and how close its outputs are to the in-memory model's. No Lightning."""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

_INSTALL = "pip install 'lightning-compress[onnx]'"
INTEGER_OPS = frozenset({
    "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "NhwcQLinearConv", "QAttention", "DynamicQuantizeLSTM",
    "GatherBlockQuantized",
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
    float_bytes: bytes, tensors: list[str], feeds: list[dict[str, Any]], onnx: Any, ort: Any
) -> dict[str, tuple[float, float]]:
    """Min / max of each named tensor of the float graph over ``batches``."""
    model = onnx.load_from_string(float_bytes)
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    calibration = session(model.SerializeToString(), ort)
    ranges: dict[str, list[float]] = {name: [np.inf, -np.inf] for name in tensors}
    for feed in feeds:
        values = calibration.run(tensors, feed)
        for name, value in zip(tensors, values):
            ranges[name][0] = min(ranges[name][0], float(value.min()))
            ranges[name][1] = max(ranges[name][1], float(value.max()))
    return {name: (lo, hi) for name, (lo, hi) in ranges.items()}


def check_runtime_ops(layers: Mapping[str, Any], model: bytes | Path, onnx: Any, ort: Any) -> None:
    """Which operator reads each layer's codes once ORT has optimized the graph (what it really runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        session(model, ort, optimized)
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
        integer = [op for op in ops if op in INTEGER_OPS or (op == "Gather" and layer.op == "Gather")]
        layer.runtime_op = integer[0] if integer else (ops[0] if ops else "constant-folded to float")
        if not integer:
            runs = f"ORT runs {layer.runtime_op} on it after optimization (no integer kernel)"
            layer.reason = f"{layer.reason}; {runs}" if layer.reason else runs


class OutputCheckError(RuntimeError):
    """ONNX Runtime's outputs cannot be trusted to equal the model's (non-finite values, a feed it cannot run, or a
    difference far beyond what integer activations cause); nothing was written."""


MAX_RELATIVE_ERROR = 0.2  # ||ORT - PyTorch|| / ||PyTorch|| of an output; more is a wrong graph, not rounding


def relative_error(want: np.ndarray, have: np.ndarray) -> float:
    """``||have - want|| / ||want||`` (0 for an empty or all-zero reference that ORT matches exactly)."""
    scale = float(np.linalg.norm(want.astype(np.float64)))
    error = float(np.linalg.norm(have.astype(np.float64) - want.astype(np.float64)))
    if scale == 0.0:
        return 0.0 if error == 0.0 else float("inf")
    return error / scale


@torch.no_grad()
def check_outputs(
    reference: nn.Module, model: bytes, names: list[str], feeds: list[tuple[str, list[Tensor], dict[str, Any]]],
    ort: Any, probe: tuple[str, list[Tensor], dict[str, Any]] | None = None,
) -> tuple[float, float, int]:
    """(max abs difference, argmax agreement of the first output, samples) of ORT's outputs ``names`` vs
    ``reference`` (positional tensors in, a tuple of the same outputs out) on each ``(where, tensors, feed)``. A NaN
    or inf in either side's outputs, or a feed ORT cannot run, raises :class:`OutputCheckError`: no agreement is ever
    reported on garbage. ``probe`` is checked alike and enters the max difference, not the sample count."""
    reference.eval()  # the caller's private copy: no third copy of a large model
    ort_session = session(model, ort)
    diff, agree, total, classified = 0.0, 0, 0, 0
    for i, (where, tensors, feed) in enumerate([*feeds, *([probe] if probe else [])]):
        try:
            expected = [t.detach().float().cpu().numpy() for t in reference(*tensors)]
        except (RuntimeError, ValueError, IndexError) as err:  # only the probe can get here: the rest ran before
            raise OutputCheckError(
                f"the model itself cannot run {where} ({[tuple(t.shape) for t in tensors]}): {str(err)[:300]}; say "
                "which axes are dynamic with `dynamic_axes` (inputs sharing a length share its name); nothing "
                "was written") from None
        try:
            got = ort_session.run(names, feed)
        except Exception as err:  # ORT raises its own Fail / InvalidArgument types
            shapes = {name: tuple(value.shape) for name, value in feed.items()}
            raise OutputCheckError(
                f"ONNX Runtime cannot run the exported graph on {where} {shapes}: {str(err)[:300]}; the model turns "
                "a size into a constant while traced. Make that axis static with `dynamic_axes` (e.g. "
                "{'input_ids': [0]}); nothing was written") from None
        for name, want, have in zip(names, expected, got):
            bad_torch, bad_ort = int((~np.isfinite(want)).sum()), int((~np.isfinite(have)).sum())
            if bad_torch or bad_ort:
                raise OutputCheckError(
                    f"output {name!r} on {where} has {bad_torch} non-finite values in PyTorch and {bad_ort} in ONNX "
                    "Runtime; the export cannot be checked, so nothing was written (look for NaN / inf weights or "
                    "an overflow in the model)")
            if want.shape != have.shape:
                raise OutputCheckError(f"output {name!r} on {where}: ONNX Runtime gives shape {have.shape}, PyTorch "
                                       f"{want.shape}; nothing was written")
            diff = max(diff, float(np.abs(have - want).max())) if want.size else diff
            relative = relative_error(want, have)
            if relative > MAX_RELATIVE_ERROR:
                raise OutputCheckError(
                    f"output {name!r} on {where}: ONNX Runtime differs from PyTorch by {relative:.3f} of the output's "
                    f"norm (allowed: {MAX_RELATIVE_ERROR}; integer activations alone stay far below it): the graph "
                    "does not compute the model (a wrong code, scale or zero point); nothing was written")
        if i == len(feeds):
            continue  # the probe
        first, first_ort = expected[0], got[0]
        if first.ndim == 2 and first.shape[1] > 1:
            agree += int((first_ort.argmax(1) == first.argmax(1)).sum())
            classified += first.shape[0]
        total += first.shape[0] if first.ndim else 1
    return diff, agree / classified if classified else float("nan"), total
