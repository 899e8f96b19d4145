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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.core.io import write_bytes
from lightning_compress.core.validation import check_choice, check_number
from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.quantization.kernels import Int8Linear
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec
from lightning_compress.serving import _rewrite
from lightning_compress.serving._graph import Graph, WeightSite, find_weight, uint8_qparams
from lightning_compress.serving._runtime import (
    INTEGER_OPS,
    calibrate,
    check_outputs,
    check_runtime_ops,
    input_batches,
    require_onnx,
    version_tuple,
)

ACTIVATIONS = ("dynamic", "static")
DEFAULT_OPSET = 17
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

    @property
    def integer(self) -> bool:
        return self.runtime_op in INTEGER_OPS


@dataclass
class OnnxExportReport:
    path: Path
    nbytes: int
    activations: str
    opset: int
    layers: dict[str, LayerExport] = field(default_factory=dict)
    max_abs_diff: float = float("nan")  # ORT vs the in-memory model, over the checked samples
    argmax_agreement: float = float("nan")  # fraction of samples whose argmax agrees (nan for 1-column outputs)
    samples: int = 0
    onnxruntime: str = ""

    @property
    def not_integer(self) -> dict[str, str]:
        """Quantized layers ORT does not run on an integer operator -> why."""
        return {name: layer.reason or f"ORT runs {layer.runtime_op}" for name, layer in self.layers.items()
                if not layer.integer}

    def __str__(self) -> str:
        ops = ", ".join(f"{n}: {layer.runtime_op or layer.op}" for n, layer in self.layers.items()) or "none"
        lines = [
            (f"{self.path} ({self.nbytes / 1e6:.2f} MB, {self.activations} activations, opset {self.opset}, "
             f"onnxruntime {self.onnxruntime})"),
            f"quantized layers -> ORT ops: {ops}",
            (f"ORT vs in-memory model on {self.samples} samples: max |diff| {self.max_abs_diff:.3g}, "
             f"argmax agreement {100 * self.argmax_agreement:.2f} %"),
        ]
        if self.not_integer:
            lines.append(f"NOT on integer kernels: {self.not_integer}")
        return "\n".join(lines)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor,
    result: QuantizationResult | Mapping[str, QuantizedTensor] | str | os.PathLike[str] | None = None,
    *,
    activations: str = "dynamic",
    calibration_data: Tensor | Iterable[Any] | None = None,
    opset: int = DEFAULT_OPSET,
    accuracy_level: int = 4,
) -> OnnxExportReport:
    """Write ``model`` to ``path`` as ONNX running our quantized layers on ORT integer kernels; check it.

    Args:
        model: the compressed model in memory (quantized in place by :func:`~lightning_compress.quantize`, loaded
            by ``load_quantized`` / ``load_compacted``, or float). ``Int8Linear`` layers export their own codes.
        example_input: one input batch (its batch axis is exported as dynamic).
        result: where the codes come from: the :class:`QuantizationResult` ``quantize`` returned, a mapping
            state-dict key -> :class:`QuantizedTensor`, or the path of a ``save_quantized`` file. ``None``: only
            ``Int8Linear`` layers are quantized (a float model exports as float).
        activations: ``"dynamic"`` (activation scales computed per batch at run time) or ``"static"`` (uint8
            scales calibrated min/max on ``calibration_data``; ``QLinearConv``). Use ``"static"`` for CNNs: ORT's
            ``ConvInteger`` (dynamic) measured 5x *slower* than fp32 on the benchmark CNN, QLinearConv 1.8x faster.
        calibration_data: a tensor of inputs, or an iterable of input tensors or ``(inputs, targets, ...)``
            batches. Required for ``"static"``; when given, the output check also runs on it.
        opset: ONNX opset of the default domain, 13..20.
        accuracy_level: ``MatMulNBits``' ``accuracy_level`` (4: int8 activations, 0: float compute).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"`example_input` must be a torch.Tensor (one input batch), got {type(example_input).__name__}")
    check_choice("activations", activations, ACTIVATIONS)
    check_number("opset", opset, low=13, high=20, integer=True)
    check_choice("accuracy_level", accuracy_level, (0, 1, 2, 3, 4))
    if activations == "static" and calibration_data is None:
        raise ValueError("`activations`='static' needs `calibration_data` (a few hundred typical inputs), got None")
    onnx, ort = require_onnx()
    batches = [] if calibration_data is None else input_batches(calibration_data)

    export_model = copy.deepcopy(model).cpu().eval()
    example_input = example_input.detach().cpu()
    codes = _collect_codes(export_model, result)
    float_bytes = _torch_export(export_model, example_input, opset)
    graph = Graph(onnx.load_from_string(float_bytes), onnx)
    state = export_model.state_dict()
    layers, sites = _plan(graph, export_model, state, codes)

    static_sites: dict[str, WeightSite] = {}
    for name, site in sites.items():
        key, qt = codes[name]
        layer = layers[name]
        try:
            route = _route(site, qt, ort.__version__)
            if route == "nbits":
                layer.op = _rewrite.matmul_nbits(graph, site, key, qt, accuracy_level)
            elif activations == "dynamic":
                layer.op = _rewrite.dynamic(graph, site, key, _int8(qt), qt.row_scale().numpy())
            else:
                _check_static(graph, site)
                static_sites[name] = site
        except _rewrite.Unsupported as why:
            layer.reason = str(why)
            _rewrite.weight_only(graph, site, key, qt)
            layer.op = "DequantizeLinear (float kernel)"
    if static_sites:
        _quantize_static(graph, static_sites, codes, layers, float_bytes, batches, onnx, ort)
    for name in sites:
        layers[name].codes = _codes_name(graph, codes[name][0])
    final = graph.finish()
    if any(node.domain == "com.microsoft" for node in final.graph.node):
        final.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    data = final.SerializeToString()
    target = write_bytes(path, data)
    report = OnnxExportReport(target, len(data), activations, opset, layers, onnxruntime=ort.__version__)
    check_runtime_ops(report.layers, target, onnx, ort)
    report.max_abs_diff, report.argmax_agreement, report.samples = check_outputs(
        model, target, [example_input, *batches], ort)
    return report


# ---------------------------------------------------------------------------------------------- collecting codes
def _collect_codes(
    model: nn.Module, result: QuantizationResult | Mapping[str, QuantizedTensor] | str | os.PathLike[str] | None
) -> dict[str, tuple[str, QuantizedTensor]]:
    """module name -> (state-dict key, codes). Replaces ``Int8Linear`` layers in ``model`` by float Linears."""
    by_key: dict[str, QuantizedTensor] = {}
    if isinstance(result, QuantizationResult):
        by_key = {layer.key: layer.qtensor for layer in result.layers.values()}
    elif isinstance(result, (str, os.PathLike)):
        from lightning_compress.quantization.export import load_quantized_tensors

        by_key = load_quantized_tensors(result)[1]
    elif isinstance(result, Mapping):
        by_key = dict(result)
    elif result is not None:
        raise TypeError("`result` must be a QuantizationResult, a mapping of state-dict keys to QuantizedTensor, "
                        f"a save_quantized file path, or None; got {type(result).__name__}")
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            qweight, scale, bias = module.qweight, module.weight_scale, module.bias
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
                if bias is not None:
                    linear.bias.copy_(bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
            qt = QuantizedTensor(qweight.clone(), scale.reshape(-1, 1).clone(), None, QuantSpec(bits=8),
                                 tuple(qweight.shape), torch.float32)
            by_key.setdefault(f"{name}.weight", qt)
    state = model.state_dict()
    codes = {}
    for key, qt in by_key.items():
        if key not in state:
            raise ValueError(f"`result` has a weight {key!r} that is not in the model's state_dict: wrong model?")
        weight = state[key].detach().float().cpu()
        if weight.shape != qt.shape or not torch.equal(weight, qt.dequantize().float().cpu()):
            raise ValueError(f"`result` does not describe `model`: {key!r} is not the dequantized codes; pass the "
                             "model quantize() changed in place (or the one load_quantized() returned)")
        codes[key.rpartition(".")[0]] = (key, qt)
    return codes


def _torch_export(model: nn.Module, example_input: Tensor, opset: int) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model, (example_input,), buffer,  # type: ignore[arg-type]  # a file object works too
            dynamo=False, opset_version=opset, input_names=["input"], output_names=["output"],
            do_constant_folding=True, dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- planning
def _plan(
    graph: Graph, model: nn.Module, state: Mapping[str, Tensor], codes: Mapping[str, tuple[str, QuantizedTensor]]
) -> tuple[dict[str, LayerExport], dict[str, WeightSite]]:
    layers: dict[str, LayerExport] = {}
    sites: dict[str, WeightSite] = {}
    claimed: set[str] = set()
    for name, (key, qt) in codes.items():
        module = model.get_submodule(name)
        layers[name] = LayerExport(name, type(module).__name__, qt.spec.bits, qt.spec.granularity, op="-")
        site = find_weight(graph, key, state[key].detach().float().cpu().numpy(), claimed)
        if isinstance(site, str):
            layers[name].reason = site
            continue
        claimed.add(site.initializer)
        sites[name] = site
    return layers, sites


def _route(site: WeightSite, qt: QuantizedTensor, ort_version: str) -> str:
    spec = qt.spec
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
    batches: list[Tensor],
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
    ranges = calibrate(float_bytes, sorted(wanted), batches, onnx, ort)
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
