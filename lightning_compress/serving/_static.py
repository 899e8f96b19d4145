"""``activations="static"``: calibrated uint8 activation scales around the int8 layers (QDQ), which ONNX Runtime
fuses into ``QLinearConv`` / ``QGemm`` / ``QLinearMatMul``. No Lightning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_compress.quantization.primitives import QuantizedTensor
from lightning_compress.serving import _rewrite, _trained
from lightning_compress.serving._graph import Graph, WeightSite, uint8_qparams
from lightning_compress.serving._report import LayerExport
from lightning_compress.serving._runtime import calibrate
from lightning_compress.serving._trained import Range


def check_static(graph: Graph, site: WeightSite) -> None:
    _, bias, _ = _rewrite.operands(graph, site)
    if bias is not None and bias not in graph.inits:
        raise _rewrite.Unsupported(f"the bias {bias!r} is computed in the graph, not an initializer")


def quantize_static(
    graph: Graph,
    sites: Mapping[str, WeightSite],
    codes: Mapping[str, tuple[str, QuantizedTensor]],
    layers: Mapping[str, LayerExport],
    float_bytes: bytes,
    feeds: list[dict[str, Any]],
    onnx: Any,
    ort: Any,
    trained: Mapping[str, Range] | None = None,
    others: Mapping[str, WeightSite] | None = None,
) -> dict[str, Range]:
    """QDQ on the inputs and outputs of the int8 layers (a following Relu is absorbed into the output's uint8
    range), calibrated min/max on ``batches``; then our codes as ``DequantizeLinear`` weights. ``trained``: QAT's
    input ranges by layer (:mod:`._trained`), written as they are; only the tensors they leave are calibrated;
    ``others``: the quantized layers not on int8 kernels. Returns the layers whose trained input range the graph
    applies -> that range (layers sharing an input: their union)."""
    outputs: dict[str, tuple[str, Any | None]] = {}  # layer -> (tensor to quantize after it, Relu to drop)
    for name, site in sites.items():
        y = site.node.output[0]
        readers = graph.consumers(y)
        relu = readers[0] if len(readers) == 1 and readers[0].op_type == "Relu" and not graph.is_output(y) else None
        out = relu.output[0] if relu is not None else y
        keep_float = site.node.op_type != "Conv" and graph.is_output(out)  # QGemm / QLinearMatMul emit float
        outputs[name] = (out if not keep_float else "", relu)
    given, used = _trained.given_params(graph, sites, others or {}, trained or {},
                                        {n: t for n, (t, _) in outputs.items()})
    wanted = ({site.node.input[0] for site in sites.values()} | {t for t, _ in outputs.values() if t}) - set(given)
    if wanted and not feeds:
        raise ValueError(f"`calibration_data` is needed: the trained activation ranges leave {sorted(wanted)[:5]} "
                         "uncalibrated")
    calibrated = calibrate(float_bytes, sorted(wanted), feeds, onnx, ort) if wanted else {}
    params = {t: uint8_qparams(*r) for t, r in calibrated.items()}
    params.update(given)
    for name, site in sites.items():
        tensor, relu = outputs[name]
        if relu is not None and tensor:
            site.node.output[0] = relu.output[0]
            graph.graph.node.remove(relu)
        if tensor:
            graph.qdq(tensor, *params[tensor])
    graph.propagate_through_transparent_ops()
    for name, site in sites.items():
        x = site.node.input[0]
        if x not in graph.params:
            site.node.input[0] = graph.qdq(x, *params[x])
        layers[name].input_range = graph.params[x]
        key, qt = codes[name]
        try:
            layers[name].op = _rewrite.static(graph, site, key, _rewrite.int8_codes(qt), qt.row_scale().numpy())
        except _rewrite.Unsupported as why:  # pragma: no cover - every precondition was checked before
            layers[name].reason = str(why)
            _rewrite.weight_only(graph, site, key, qt)
            layers[name].op = "DequantizeLinear (float kernel)"
    return used
