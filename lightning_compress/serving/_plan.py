"""Which node of the exported graph holds each quantized weight, and which integer form it can take. No Lightning.

:func:`plan` finds every quantized weight in the graph torch exported (:func:`~._graph.find_weight`);
:func:`mark_unused` tells a layer the exported outputs do not use (dead code the tracer dropped) from one the graph
hides; :func:`route` picks the integer form: ``Gather`` of the codes for an embedding, ``MatMulNBits`` for <= 4-bit
or per-group Linear codes, ``int8`` (``MatMulInteger`` / ``ConvInteger`` / QDQ) for the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_compress.quantization.primitives import QuantizedTensor
from lightning_compress.serving import _codes, _inputs, _rewrite
from lightning_compress.serving._graph import Graph, WeightSite, find_weight
from lightning_compress.serving._report import LayerExport
from lightning_compress.serving._runtime import version_tuple

WRAPPED = "model."  # the exported module is _inputs.Exported, holding the model as `model`
NBITS_MIN_ORT = (1, 20)  # MatMulNBits' bias input and 8-bit CPU kernel (tested: 1.32)


def plan(
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


def mark_unused(
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


def route(site: WeightSite, qt: QuantizedTensor, ort_version: str) -> str:
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


def codes_name(graph: Graph, key: str) -> str:
    candidates = [name for name in graph.inits if name.startswith(f"{key}_quantized")]
    return candidates[-1] if candidates else ""
