"""``export_onnx``: the compressed model as an ONNX graph that ONNX Runtime runs on integer kernels. No Lightning.

1. torch exports the in-memory model (float, quantized -- its weights are the dequantized values --, or compacted)
   with the TorchScript exporter (``dynamo=False``: the torch.export one needs ``onnxscript``), batch axis dynamic.
2. Each quantized weight is found in that graph (by name, or by value: a Linear's ``MatMul`` holds ``w.T``, an
   eval-mode BatchNorm is folded into its Conv's rows) and its node is rewritten from *our* codes and scales,
   never re-quantized (:mod:`._rewrite`): int8-able codes (per-tensor / per-channel) go to
   ``MatMulInteger`` / ``ConvInteger`` (``activations="dynamic"``) or to QDQ with calibrated uint8 activations
   (``"static"``, which ORT fuses into ``QLinearConv`` / ``QGemm``); Linear codes of <= 4 bits or with per-group
   scales go to ``com.microsoft.MatMulNBits``; anything else keeps float kernels on ``DequantizeLinear`` of our
   codes, and the report says why.
3. The file is written atomically, then checked: ORT optimizes the graph (what it will really run) and each
   quantized layer's codes must be read by an integer operator; ORT's outputs are compared with the in-memory
   model's (max abs difference, argmax agreement) on ``example_input`` and the calibration data.

``onnx`` and ``onnxruntime`` are an optional extra, imported only here.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.core.io import write_bytes
from lightning_compress.core.validation import check_choice, check_number
from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.quantization.primitives import QuantizedTensor
from lightning_compress.serving import _codes, _inputs, _rewrite
from lightning_compress.serving._graph import Graph, WeightSite, find_weight, uint8_qparams
from lightning_compress.serving._inputs import OutputKey
from lightning_compress.serving._runtime import (
    INTEGER_OPS,
    OutputCheckError,  # noqa: F401 - re-exported
    calibrate,
    check_outputs,
    check_runtime_ops,
    require_onnx,
    version_tuple,
)
from lightning_compress.serving._traceable import make_traceable

ACTIVATIONS = ("dynamic", "static")
DEFAULT_OPSET = 17
WRAPPED = "model."  # the exported module is _inputs.Exported, holding the model as `model`
NBITS_MIN_ORT = (1, 20)  # MatMulNBits' bias input and 8-bit CPU kernel (tested: 1.32)


@dataclass
class LayerExport:
    """How one quantized layer was exported and what ONNX Runtime runs for it."""

    module: str
    module_type: str
    bits: int
    granularity: str
    op: str  # what the written graph holds: MatMulInteger, ConvInteger, QLinearConv, QGemm, MatMulNBits, ...
    runtime_op: str | None = None  # the operator reading our codes after ORT's graph optimizations
    reason: str = ""  # why it is not on an integer operator
    codes: str = ""  # name of the initializer holding the codes
    used: bool = True  # False: the exported outputs do not depend on this layer, so the graph has no trace of it

    @property
    def integer(self) -> bool:
        """On an integer operator, or an embedding looked up from its integer table (``Gather`` of our codes)."""
        return self.runtime_op in INTEGER_OPS or (self.runtime_op == "Gather" and self.op == "Gather")


@dataclass
class OnnxExportReport:
    path: Path
    nbytes: int
    activations: str
    opset: int
    layers: dict[str, LayerExport] = field(default_factory=dict)
    max_abs_diff: float = float("nan")  # ORT vs the in-memory model, over the checked samples and outputs
    argmax_agreement: float = float("nan")  # fraction of samples whose argmax agrees (nan unless (batch, classes))
    samples: int = 0
    onnxruntime: str = ""
    inputs: list[str] = field(default_factory=list)  # graph input names, in order
    outputs: list[str] = field(default_factory=list)  # graph output names, in order
    source: str = ""  # where the codes came from: "result", the carried record's source, "" for a float model

    @property
    def not_integer(self) -> dict[str, str]:
        """Quantized layers ORT does not run on an integer operator -> why."""
        return {name: layer.reason or f"ORT runs {layer.runtime_op}" for name, layer in self.layers.items()
                if not layer.integer and layer.used}

    @property
    def unused(self) -> list[str]:
        """Quantized layers the exported outputs do not depend on (e.g. BERT's pooler under ``last_hidden_state``)."""
        return [name for name, layer in self.layers.items() if not layer.used]

    def __str__(self) -> str:
        ops = ", ".join(f"{n}: {layer.runtime_op or layer.op}" for n, layer in self.layers.items())
        agreement = ("n/a" if self.argmax_agreement != self.argmax_agreement
                     else f"{100 * self.argmax_agreement:.2f} %")
        lines = [
            (f"{self.path} ({self.nbytes / 1e6:.2f} MB, {self.activations} activations, opset {self.opset}, "
             f"onnxruntime {self.onnxruntime}); inputs {self.inputs} -> outputs {self.outputs}"),
            (f"quantized layers ({self.source}) -> ORT ops: {ops}" if self.layers
             else "float model: nothing quantized (no `result`, no codes carried by the model)"),
            (f"ORT vs in-memory model on {self.samples} samples: max |diff| {self.max_abs_diff:.3g}, "
             f"argmax agreement {agreement}"),
        ]
        if self.not_integer:
            lines.append(f"NOT on integer kernels: {self.not_integer}")
        if self.unused:
            lines.append(f"not in the graph (the exported outputs do not use them): {self.unused}")
        return "\n".join(lines)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None = None,
    result: QuantizationResult | Mapping[str, QuantizedTensor] | str | os.PathLike[str] | None = None,
    *,
    outputs: OutputKey | Sequence[OutputKey] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    activations: str = "dynamic",
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
            scales calibrated min/max on ``calibration_data``; ``QLinearConv``). Use ``"static"`` for CNNs: ORT's
            ``ConvInteger`` (dynamic) is slower than fp32 on the benchmark CNN, QLinearConv faster.
        calibration_data: a tensor of inputs, or an iterable of batches shaped like ``example_inputs`` (for a
            tensor example: tensors or ``(inputs, targets, ...)``; for a dict: dicts with its keys; for a tuple:
            tuples starting with its tensors). Required for ``"static"``; when given, the output check also runs on
            it.
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
    check_choice("activations", activations, ACTIVATIONS)
    check_number("opset", opset, low=13, high=20, integer=True)
    check_choice("accuracy_level", accuracy_level, (0, 1, 2, 3, 4))
    wanted = _inputs.check_outputs_arg(outputs)
    if activations == "static" and calibration_data is None:
        raise ValueError("`activations`='static' needs `calibration_data` (a few hundred typical inputs), got None")
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
    layers, sites = _plan(graph, types, export_model.state_dict(), codes)
    _mark_unused(layers, sites, codes, wrapped, inputs, out_names)

    static_sites: dict[str, WeightSite] = {}
    for name, site in sites.items():
        key, qt = codes[name]
        layer = layers[name]
        try:
            route = _route(site, qt, ort.__version__)
            if route == "nbits":
                layer.op = _rewrite.matmul_nbits(graph, site, key, qt, accuracy_level)
            elif route == "gather":
                layer.op = _rewrite.gather(graph, site, key, qt)
            elif activations == "dynamic":
                layer.op = _rewrite.dynamic(graph, site, key, _int8(qt), qt.row_scale().numpy())
            else:
                _check_static(graph, site)
                static_sites[name] = site
        except _rewrite.Unsupported as why:
            layer.reason = str(why)
            _rewrite.weight_only(graph, site, key, qt)
            layer.op = "DequantizeLinear (float kernel)"
    feeds = [("the example", inputs.tensors, inputs.feed(inputs.tensors))]
    feeds += [(f"calibration batch {i}", tensors, inputs.feed(tensors)) for i, tensors in enumerate(batches)]
    if static_sites:
        _quantize_static(graph, static_sites, codes, layers, float_bytes, [f for _, _, f in feeds[1:]], onnx, ort)
    other = _inputs.probe(inputs, in_axes)  # the dynamic axes must really be dynamic
    probe = None if other is None else ("the example at other sizes along its dynamic axes", other, inputs.feed(other))
    for name in sites:
        layers[name].codes = _codes_name(graph, codes[name][0])
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


# ---------------------------------------------------------------------------------------------- planning
def _plan(
    graph: Graph, types: Mapping[str, str], state: Mapping[str, Tensor], codes: _codes.Codes
) -> tuple[dict[str, LayerExport], dict[str, WeightSite]]:
    layers: dict[str, LayerExport] = {}
    sites: dict[str, WeightSite] = {}
    claimed: set[str] = set()
    for name, (key, qt) in codes.items():
        layers[name] = LayerExport(name, types[name], qt.spec.bits, qt.spec.granularity, op="-")
        site = find_weight(graph, f"{WRAPPED}{key}", state[key].detach().float().cpu().numpy(), claimed)
        if isinstance(site, str):
            layers[name].reason = site
            continue
        claimed.add(site.initializer)
        sites[name] = site
    return layers, sites


def _mark_unused(
    layers: Mapping[str, LayerExport], sites: Mapping[str, WeightSite], codes: _codes.Codes,
    wrapped: nn.Module, inputs: _inputs.Inputs, out_names: list[str],
) -> None:
    """Layers found nowhere in the graph whose weight the exported outputs do not depend on (autograd says so
    exactly): the tracer dropped them as dead code, which is not a failure to reach an integer kernel."""
    missing = [name for name in layers if name not in sites]
    params = dict(wrapped.named_parameters())
    weights = {name: params[f"{WRAPPED}{codes[name][0]}"] for name in missing if f"{WRAPPED}{codes[name][0]}" in params}
    if not weights:
        return
    flags = {name: w.requires_grad for name, w in weights.items()}
    try:
        with torch.enable_grad():
            for w in weights.values():
                w.requires_grad_(True)
            outs = [o for o in wrapped(*inputs.tensors) if o.is_floating_point()]
            total = sum((o.float().sum() for o in outs), torch.zeros(()))
            grads = (torch.autograd.grad(total, list(weights.values()), allow_unused=True) if total.requires_grad
                     else [None] * len(weights))
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
    for name, grad in zip(weights, grads):
        if grad is None:
            layers[name].used = False
            layers[name].reason = f"the exported outputs {out_names} do not depend on it (dead code in this graph)"


def _route(site: WeightSite, qt: QuantizedTensor, ort_version: str) -> str:
    spec = qt.spec
    if site.node.op_type == "Gather":
        return "gather"
    linear = site.node.op_type in ("Gemm", "MatMul")
    if linear and (spec.bits <= 4 or spec.granularity == "per_group"):
        if version_tuple(ort_version) < NBITS_MIN_ORT:
            raise _rewrite.Unsupported(f"MatMulNBits with a bias and 8-bit blocks needs onnxruntime >= "
                                       f"{'.'.join(map(str, NBITS_MIN_ORT))}, found {ort_version}")
        return "nbits"
    if qt.int_weight() is None:
        raise _rewrite.Unsupported(
            f"{spec.bits}-bit {spec.granularity} codes (symmetric={spec.symmetric}) have no int8 form with one scale "
            "per output channel; integer Conv needs per_tensor / per_channel codes, symmetric or <= 7 bits")
    return "int8"


def _int8(qt: QuantizedTensor) -> np.ndarray:
    codes = qt.int_weight()
    if codes is None:
        raise _rewrite.Unsupported(f"{qt.spec.bits}-bit {qt.spec.granularity} codes have no int8 form")
    return codes.cpu().numpy()


def _check_static(graph: Graph, site: WeightSite) -> None:
    _, bias, _ = _rewrite.operands(graph, site)
    if bias is not None and bias not in graph.inits:
        raise _rewrite.Unsupported(f"the bias {bias!r} is computed in the graph, not an initializer")


def _codes_name(graph: Graph, key: str) -> str:
    candidates = [name for name in graph.inits if name.startswith(f"{key}_quantized")]
    return candidates[-1] if candidates else ""


# ---------------------------------------------------------------------------------------------- static activations
def _quantize_static(
    graph: Graph,
    sites: Mapping[str, WeightSite],
    codes: Mapping[str, tuple[str, QuantizedTensor]],
    layers: Mapping[str, LayerExport],
    float_bytes: bytes,
    feeds: list[dict[str, Any]],
    onnx: Any,
    ort: Any,
) -> None:
    """QDQ on the inputs and outputs of the int8 layers (a following Relu is absorbed into the output's uint8
    range), calibrated min/max on ``batches``; then our codes as ``DequantizeLinear`` weights."""
    outputs: dict[str, tuple[str, Any | None]] = {}  # layer -> (tensor to quantize after it, Relu to drop)
    for name, site in sites.items():
        y = site.node.output[0]
        readers = graph.consumers(y)
        relu = readers[0] if len(readers) == 1 and readers[0].op_type == "Relu" and not graph.is_output(y) else None
        out = relu.output[0] if relu is not None else y
        keep_float = site.node.op_type != "Conv" and graph.is_output(out)  # QGemm / QLinearMatMul emit float
        outputs[name] = (out if not keep_float else "", relu)
    wanted = {site.node.input[0] for site in sites.values()} | {t for t, _ in outputs.values() if t}
    ranges = calibrate(float_bytes, sorted(wanted), feeds, onnx, ort)
    for name, site in sites.items():
        tensor, relu = outputs[name]
        if relu is not None and tensor:
            site.node.output[0] = relu.output[0]
            graph.graph.node.remove(relu)
        if tensor:
            graph.qdq(tensor, *uint8_qparams(*ranges[tensor]))
    graph.propagate_through_transparent_ops()
    for name, site in sites.items():
        x = site.node.input[0]
        if x not in graph.params:
            site.node.input[0] = graph.qdq(x, *uint8_qparams(*ranges[x]))
        key, qt = codes[name]
        try:
            layers[name].op = _rewrite.static(graph, site, key, _int8(qt), qt.row_scale().numpy())
        except _rewrite.Unsupported as why:  # pragma: no cover - every precondition was checked before
            layers[name].reason = str(why)
            _rewrite.weight_only(graph, site, key, qt)
            layers[name].op = "DequantizeLinear (float kernel)"
