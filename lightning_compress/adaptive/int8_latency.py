"""int8 layers under a latency budget: what the latency table times, what a chosen layer carries, and the graph the
delivered model is timed as. No Lightning import.

A layer chosen int8 gets 8-bit symmetric per-channel codes (min / max range, :data:`INT8`), written into its weight
and carried on the model (:mod:`lightning_compress.quantization.carried`, through
:func:`~lightning_compress.quantization.functional.quantize`), so ``save_quantized`` and ``export_onnx`` take it
as it is. Its ONNX form is what :func:`~lightning_compress.serving.onnx.export_onnx` emits with
``activations="static"`` (:data:`ACTIVATIONS`): calibrated uint8 activations, which ORT runs as ``QLinearConv`` /
``QGemm``. The dynamic form (``ConvInteger`` / ``MatMulInteger``) is not offered: ORT's ``ConvInteger`` ran
slower than the float convolution on this project's CNNs (README, "Serving"). Both the per-layer rows of the
latency table (:func:`int8_layer_graph`) and the delivered model (:func:`onnx_graph`) go through ``export_onnx``
itself, so what is timed is what the export writes; a layer the export does not put on an integer operator gets
no int8 row, and so is never chosen int8. The delivered model also carries the uint8 input range each int8 layer
was exported with (:func:`carry_input_ranges`): the bound is judged with them applied (:func:`as_served`), and
``export_onnx(model)`` writes that static graph by default.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.modules import weight_of
from lightning_compress.core.selection import anchored
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.functional import quantize
from lightning_compress.quantization.primitives import QuantSpec, quantize_tensor
from lightning_compress.serving._trained import collect
from lightning_compress.serving.onnx import export_onnx

INT8 = QuantSpec(bits=8, granularity="per_channel", symmetric=True, calibration="minmax")
ACTIVATIONS = "static"
EXAMPLE_ROWS = 2  # the export's example batch (the graph has a dynamic batch axis: it is timed at the full shape)
CALIBRATION_ROWS = 16  # random rows calibrating a one-layer graph's activations (its speed does not depend on them)
SOURCE = "compress(latency budget, int8)"


def _export(model: nn.Module, example: Tensor, calibration: list[Tensor]) -> tuple[bytes, Any]:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "graph.onnx")
        report = export_onnx(model, path, example, activations=ACTIVATIONS, calibration_data=calibration)
        with open(path, "rb") as handle:
            return handle.read(), report


def quantize_int8(model: nn.Module, names: Iterable[str]) -> None:
    """``model``'s layers ``names`` to :data:`INT8` codes, in place, carried on ``model``."""
    include = [anchored(name) for name in sorted(names)]
    if include:
        quantize(model, bits=INT8.bits, granularity=INT8.granularity, symmetric=INT8.symmetric,
                 calibration=INT8.calibration, include=include)


def int8_layer_graph(module: nn.Module, shape: Sequence[int]) -> bytes | None:
    """A copy of one layer at :data:`INT8` as ``export_onnx`` writes it, to be timed at input ``shape``; None when
    the export does not run it on an integer operator."""
    layer = nn.Sequential(copy.deepcopy(module)).eval()
    quantize_int8(layer, ["0"])
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(min(EXAMPLE_ROWS, shape[0]), *shape[1:], generator=generator)
    calibration = [torch.randn(CALIBRATION_ROWS, *shape[1:], generator=generator)]
    data, report = _export(layer, example, calibration)
    return None if report.not_integer else data


def int8_model_graph(model: nn.Module, names: Iterable[str], shape: Sequence[int]) -> bytes:
    """A copy of ``model`` with its layers ``names`` at :data:`INT8`, as ``export_onnx`` writes it (activations
    calibrated on random inputs: its speed does not depend on them), to be timed at input ``shape``."""
    copied = copy.deepcopy(model).eval()
    quantize_int8(copied, names)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(min(EXAMPLE_ROWS, shape[0]), *shape[1:], generator=generator)
    return _export(copied, example, [torch.randn(CALIBRATION_ROWS, *shape[1:], generator=generator)])[0]


def calibration_inputs(batches: Sequence[Any]) -> list[Tensor]:
    """The float input tensor of each calibration batch (a tensor, or the first item of a tuple / list)."""
    inputs = []
    for batch in batches:
        tensor = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if isinstance(tensor, Tensor) and tensor.is_floating_point():
            inputs.append(tensor.detach().cpu())
    return inputs


def onnx_graph(model: nn.Module, calibration: list[Tensor]) -> tuple[bytes, Any]:
    """``model`` (carrying its int8 codes) as ``export_onnx(..., activations="static")`` writes it, calibrated and
    checked on ``calibration``; and the export's report."""
    return _export(model, calibration[0][:EXAMPLE_ROWS], calibration)


def carry_input_ranges(model: nn.Module, report: Any) -> None:
    """Record on ``model`` (carrying its int8 codes) the uint8 input range each int8 layer was exported with
    (``report``: :func:`onnx_graph`'s): ``export_onnx(model)`` then writes that static graph, the one timed, with no
    calibration data where the ranges cover every quantized tensor, and :func:`as_served` applies them."""
    record = carried(model)
    ranges = {f"{name}.weight": layer.input_range for name, layer in report.layers.items()
              if layer.input_range is not None}
    if record is not None:
        record.activations.update({key: r for key, r in ranges.items() if key in record.codes})


@contextmanager
def as_served(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` reading each int8 layer's input as the static graph does (uint8 at the input range it carries:
    fixed fake quantizers of :mod:`lightning_compress.qat.activations`, the ones the export's own output check
    applies), while the block runs; removed after it, also on an error."""
    from lightning_compress.qat.activations import attach, detach  # qat imports serving: not at import time

    found = collect(model)
    layers = {name: model.get_submodule(name) for name in found}
    keys = {name: f"{name}.weight" for name in found}
    quantizers = attach(layers, keys, {keys[n]: r for n, r in found.items()}, learn=False)
    try:
        yield model
    finally:
        detach(model, quantizers, keys)


def int8_scores(modules: Mapping[str, nn.Module], fisher: Mapping[str, Tensor]) -> dict[str, float]:
    """Per layer, ``1/2 * sum(F * (W - Q(W))^2)`` of its :data:`INT8` codes over the whole dense layer (a compacted
    layer keeps part of it: this over-predicts what int8 costs there, never under)."""
    scores = {}
    for name, module in modules.items():
        weight = weight_of(module, name).detach().float()
        error = quantize_tensor(weight, INT8).dequantize().float() - weight
        scores[name] = 0.5 * float((fisher[name].float() * error.square()).sum())
    return scores
