"""``export_onnx``: the compressed model as an ONNX graph that ONNX Runtime runs on integer kernels. No Lightning.

0. Everything the caller gives is checked first (:mod:`._inputs`): the path ends in ``.onnx``, the inputs are
   finite, and the model runs once in PyTorch on the example (a failure names the example's shapes and what the
   first layer expects). Codes come from ``result`` or from what the model carries (:mod:`._codes`).
1. torch exports the in-memory model (float, quantized -- its weights are the dequantized values --, or compacted)
   with the TorchScript exporter (``dynamo=False``: the torch.export one needs ``onnxscript``), through a wrapper
   taking positional tensors and returning the selected outputs; integer (token) inputs get dynamic batch and
   sequence axes, float ones a dynamic batch axis. ``nn.MultiheadAttention`` is traced as the same math with a
   symbolic length (:mod:`._traceable`).
2. Each quantized weight is found in that graph (by name, or by value: a Linear's ``MatMul`` holds ``w.T``, an
   eval-mode BatchNorm is folded into its Conv's rows) and its node is rewritten from *our* codes and scales,
   never re-quantized (:mod:`._plan`, :mod:`._rewrite`): int8-able codes (per-tensor / per-channel) go to
   ``MatMulInteger`` / ``ConvInteger`` (``activations="dynamic"``) or to QDQ with calibrated uint8 activations
   (``"static"``, :mod:`._static`, which ORT fuses into ``QLinearConv`` / ``QGemm``); Linear codes of <= 4 bits
   or with per-group scales go to ``com.microsoft.MatMulNBits``; embeddings to ``Gather`` of the integer table
   (4-bit codes packed two per byte on ``com.microsoft.GatherBlockQuantized``, :mod:`._packed_gather`);
   anything else keeps float kernels on ``DequantizeLinear`` of our codes, and the report says why.
3. The graph is checked from memory before it is written: ORT optimizes it (what it will really run) and each
   quantized layer's codes must be read by an integer operator (or the report names why not); ORT's outputs are
   compared with the in-memory model's on the example, the calibration data and the example at other sizes along
   its dynamic axes. A NaN / inf on either side, or a shape ORT cannot run, raises :class:`OutputCheckError`.
   Only then is the file written, atomically.

``onnx`` and ``onnxruntime`` are an optional extra, imported only when :func:`export_onnx` runs.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.io import write_bytes
from lightning_compress.core.validation import check_choice, check_number
from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.quantization.primitives import QuantizedTensor
from lightning_compress.serving import _codes, _inputs, _packed_gather, _plan, _rewrite, _static, _trained
from lightning_compress.serving._graph import Graph, WeightSite
from lightning_compress.serving._inputs import OutputKey
from lightning_compress.serving._report import LayerExport, OnnxExportReport
from lightning_compress.serving._runtime import (
    INTEGER_OPS,
    OutputCheckError,
    check_outputs,
    check_runtime_ops,
    require_onnx,
)
from lightning_compress.serving._traceable import make_traceable

__all__ = ["INTEGER_OPS", "LayerExport", "OnnxExportReport", "OutputCheckError", "export_onnx"]

ACTIVATIONS = ("dynamic", "static")
DEFAULT_OPSET = 17


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None = None,
    result: QuantizationResult | Mapping[str, QuantizedTensor] | str | os.PathLike[str] | None = None,
    *,
    outputs: OutputKey | Sequence[OutputKey] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    activations: str | None = None,
    calibration_data: Tensor | Iterable[Any] | None = None,
    opset: int = DEFAULT_OPSET,
    accuracy_level: int = 4,
    example_input: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None = None,
) -> OnnxExportReport:
    """Write ``model`` to ``path`` as ONNX running our quantized layers on ORT integer kernels; check it first.

    Everything is checked before anything is written: the arguments, the inputs (finite), one PyTorch run of the
    example; then the graph is built and run in ONNX Runtime from memory, and only a graph whose outputs are finite
    and whose report is complete is written (atomically). A failed check leaves no file (and an older file at
    ``path`` untouched).

    Args:
        model: the compressed model in memory (quantized in place by :func:`~lightning_compress.quantize`, loaded
            by ``load_quantized`` / ``load_compacted``, or float), e.g. a Hugging Face ``BertModel`` as it is.
        path: where to write; must end in ``.onnx`` (a ``.safetensors`` export is ``save_quantized``'s job).
        example_inputs: one input batch: a tensor (graph input ``input``), a tuple of tensors (positional
            arguments, named after ``model.forward``'s parameters) or a dict of keyword tensors (named after its
            keys). Integer tensors keep their dtype. ``example_input=`` is the older name of the same argument.
        result: where the codes come from: the :class:`QuantizationResult` ``quantize`` returned, a mapping
            state-dict key -> :class:`QuantizedTensor` (keys may carry or lack one wrapper prefix), or the path of a
            ``save_quantized`` file. ``None``: the codes the model carries (``quantize()``, the callback and
            ``load_quantized`` attach them) and its ``Int8Linear`` layers; a model carrying none exports as float
            and the report says so.
        outputs: which outputs of a model returning a tuple, dict or ``ModelOutput`` to export and check: names
            (``"last_hidden_state"``) or indices; default the first tensor. A tensor output is named ``output``.
        dynamic_axes: per input name, the dims to make dynamic (a list, or dim -> name); default dims 0 and 1
            (batch, sequence) for integer inputs, dim 0 for float ones.
        activations: ``"dynamic"`` (activation scales computed per batch at run time) or ``"static"`` (uint8
            scales calibrated min/max on ``calibration_data``, or the input ranges the model carries -- QAT's
            trained ones, a latency plan's calibrated ones -- written as they are; ``QLinearConv``). Use
            ``"static"`` for CNNs: ORT's ``ConvInteger`` (dynamic) is slower than fp32 on the benchmark CNN,
            QLinearConv faster. None (default): ``"static"`` for a model carrying input ranges (it was trained,
            or judged and timed, with uint8 inputs: the graph to serve is that one), else ``"dynamic"``.
        calibration_data: a tensor of inputs, or an iterable of batches shaped like ``example_inputs`` (for a
            tensor example: tensors or ``(inputs, targets, ...)``; for a dict: dicts with its keys; for a tuple:
            tuples starting with its tensors). Required for ``"static"`` (unless trained ranges cover every
            quantized tensor); when given, the output check also runs on it.
        opset: ONNX opset of the default domain, 13..20.
        accuracy_level: ``MatMulNBits``' ``accuracy_level`` (4: int8 activations, 0: float compute).
    """
    if example_input is not None:
        if example_inputs is not None:
            raise TypeError("pass `example_inputs` or its older name `example_input`, not both")
        example_inputs, argument = example_input, "example_input"
    else:
        argument = "example_inputs"
    _check_model(model)
    target = _check_path(path)
    if example_inputs is None:
        raise TypeError(f"`{argument}` is required: one input batch (a tensor, a tuple or a dict of tensors)")
    if activations is None:
        activations = "static" if _trained.collect(model) else "dynamic"
    check_choice("activations", activations, ACTIVATIONS)
    check_number("opset", opset, low=13, high=20, integer=True)
    check_choice("accuracy_level", accuracy_level, (0, 1, 2, 3, 4))
    wanted = _inputs.check_outputs_arg(outputs)
    if activations == "static" and calibration_data is None and not _trained.collect(model):
        raise ValueError("`activations`='static' needs `calibration_data` (a few hundred typical inputs) or a model "
                         "carrying trained activation ranges (QuantizationAwareTraining(activations='int8')), got None")
    inputs = _inputs.prepare(model, example_inputs, argument)
    _inputs.check_finite(argument, inputs.names, inputs.tensors)
    in_axes = _inputs.axes(inputs, dynamic_axes)
    batches = [] if calibration_data is None else _inputs.batches_like(inputs, calibration_data)
    onnx, ort = require_onnx()

    reference = copy.deepcopy(model).cpu().eval()
    out_names, positions = _inputs.select(_inputs.dry_run(reference, inputs), wanted)
    export_model = copy.deepcopy(reference)
    codes, source = _codes.collect(export_model, result)
    types = {name: type(export_model.get_submodule(name)).__name__ for name in codes}
    make_traceable(export_model)  # nn.MultiheadAttention -> the same math with a symbolic sequence length
    wrapped = _inputs.Exported(export_model, inputs, positions).eval()
    float_bytes = _torch_export(wrapped, inputs, out_names, in_axes, opset)
    graph = Graph(onnx.load_from_string(float_bytes), onnx)
    layers, sites = _plan.plan(graph, types, export_model.state_dict(), codes)
    _plan.mark_unused(layers, sites, codes, wrapped, inputs, out_names)

    static_sites = _rewrite_layers(graph, sites, codes, layers, activations, accuracy_level, ort.__version__)
    feeds = [("the example", inputs.tensors, inputs.feed(inputs.tensors))]
    feeds += [(f"calibration batch {i}", tensors, inputs.feed(tensors)) for i, tensors in enumerate(batches)]
    if static_sites:
        calibration = [f for _, _, f in feeds[1:]]
        trained = _trained.collect(model, codes)  # QAT's input ranges (activations="int8")
        others = {name: site for name, site in sites.items() if name not in static_sites}
        used = _static.quantize_static(graph, static_sites, codes, layers, float_bytes, calibration, onnx, ort,
                                       trained, others)
        _trained.fake_quantize(reference, used)  # the output check: vs QAT's ranges as the graph applies them
    other = _inputs.probe(inputs, in_axes)  # the dynamic axes must really be dynamic
    probe = None if other is None else ("the example at other sizes along its dynamic axes", other,
                                        inputs.feed(other))
    for name in sites:
        layers[name].codes = _plan.codes_name(graph, codes[name][0])
    final = graph.finish()
    if any(node.domain == "com.microsoft" for node in final.graph.node):
        final.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    data = final.SerializeToString()
    report = OnnxExportReport(target, len(data), activations, opset, layers, onnxruntime=ort.__version__,
                              inputs=list(inputs.names), outputs=out_names, source=source)
    check_runtime_ops(report.layers, data, onnx, ort)
    report.max_abs_diff, report.argmax_agreement, report.samples = check_outputs(
        _inputs.Exported(reference, inputs, positions), data, out_names, feeds, ort, probe)
    report.path = write_bytes(target, data)  # only a checked graph reaches the disk
    return report


def _rewrite_layers(
    graph: Graph, sites: Mapping[str, WeightSite], codes: _codes.Codes, layers: Mapping[str, LayerExport],
    activations: str, accuracy_level: int, ort_version: str,
) -> dict[str, WeightSite]:
    """Each found weight onto its integer form (a layer that has none keeps float kernels on ``DequantizeLinear``
    of our codes, with the reason); returns the int8 sites left for static activation quantization."""
    static_sites: dict[str, WeightSite] = {}
    for name, site in sites.items():
        key, qt = codes[name]
        layer = layers[name]
        try:
            route = _plan.route(site, qt, ort_version)
            if route == "nbits":
                layer.op = _rewrite.matmul_nbits(graph, site, key, qt, accuracy_level)
            elif route == "gather":
                layer.op, layer.reason = _packed_gather.embedding(graph, site, key, qt, ort_version)
            elif activations == "dynamic":
                layer.op = _rewrite.dynamic(graph, site, key, _rewrite.int8_codes(qt), qt.row_scale().numpy())
            else:
                _static.check_static(graph, site)
                static_sites[name] = site
        except _rewrite.Unsupported as why:
            layer.reason = str(why)
            _rewrite.weight_only(graph, site, key, qt)
            layer.op = "DequantizeLinear (float kernel)"
    return static_sites


def _check_model(model: Any) -> None:
    if isinstance(model, nn.Module):
        return
    if isinstance(model, Mapping):
        raise TypeError(f"`model` must be a torch.nn.Module, got a {type(model).__name__} (a state_dict?): build "
                        "the model and call load_state_dict (or load_compressed) first")
    raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")


def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path ending in '.onnx', got {type(path).__name__}")
    target = Path(path)
    if target.suffix.lower() != ".onnx":
        hint = " (a safetensors export is save_quantized's job)" if target.suffix == ".safetensors" else ""
        raise ValueError(f"`path`={os.fspath(path)!r} must end in '.onnx'{hint}")
    if target.is_dir():
        raise ValueError(f"`path`={os.fspath(path)!r} is an existing directory; allowed: a file path ending in "
                         "'.onnx'")
    return target


def _torch_export(
    model: nn.Module, inputs: _inputs.Inputs, outputs: list[str], in_axes: Mapping[str, Mapping[int, str]], opset: int
) -> bytes:
    buffer = io.BytesIO()
    sample = model(*inputs.tensors)  # with grad, as the tracer runs it (no fused inference-only fast paths)
    axes: dict[str, Any] = {name: dict(dims) for name, dims in in_axes.items() if dims}
    for name, value in zip(outputs, sample):
        axes[name] = _inputs.output_axes(inputs, in_axes, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model, tuple(inputs.tensors), buffer,  # type: ignore[arg-type]  # a file object works too
            dynamo=False, opset_version=opset, input_names=inputs.names, output_names=outputs,
            do_constant_folding=True, dynamic_axes=axes,
        )
    return buffer.getvalue()
