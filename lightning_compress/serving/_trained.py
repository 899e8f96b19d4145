"""Trained activation ranges in ``export_onnx(activations="static")``: QAT with ``activations="int8"`` leaves, in
what the model carries (:mod:`lightning_compress.quantization.carried`), the uint8 ``(scale, zero point)`` of each
quantized layer's input; the static export writes them as they are instead of calibrating, so the graph delivered
is the one that was trained and validated. No Lightning.

- :func:`collect`: the ranges by module name (a submodule's record prefixed with its name, as the codes are);
- :func:`fake_quantize`: the export's PyTorch reference gets the same fixed input quantizers, so the output check
  compares ORT with the fake-quantized model it should compute;
- :func:`given_params`: which graph tensors take a trained range: each layer's input, and the tensor before it
  that QDQ quantizes on the previous layer's output (followed through MaxPool / Flatten / ... the way
  :meth:`~._graph.Graph.propagate_through_transparent_ops` gives them one range); a tensor read by several layers
  trained with different ranges (attention's Q / K / V) takes their union (:func:`union`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_compress.quantization.activation_ranges import QMAX, QMIN
from lightning_compress.quantization.carried import carried
from lightning_compress.serving._graph import TRANSPARENT_OPS, Graph, WeightSite, uint8_qparams

Range = tuple[float, int]  # (scale, uint8 zero point), as lightning_compress.qat.activations.Range


def collect(model: nn.Module, layers: Mapping[str, Any] | None = None) -> dict[str, Range]:
    """The trained input ranges ``model`` and its submodules carry, by module name, for the quantized ``layers``
    (None: all)."""
    found: dict[str, Range] = {}
    for prefix, module in model.named_modules():
        record = carried(module)
        for key, value in (record.activations if record is not None else {}).items():
            name = f"{prefix}.{key}" if prefix else key
            found.setdefault(name.rpartition(".")[0], value)
    return {name: value for name, value in found.items() if layers is None or name in layers}


def fake_quantize(reference: nn.Module, ranges: Mapping[str, Range]) -> None:
    """Fixed input quantizers on ``reference``'s layers (pre-hooks, on the export's own copy)."""
    from lightning_compress.qat.activations import attach  # imports serving._graph: not at import time

    attach({name: reference.get_submodule(name) for name in ranges}, {name: name for name in ranges}, ranges,
           learn=False)


def given_params(graph: Graph, static: Mapping[str, WeightSite], others: Mapping[str, WeightSite],
                 ranges: Mapping[str, Range], outputs: Mapping[str, str]) -> tuple[dict[str, Range], dict[str, Range]]:
    """Graph tensor -> trained range, and the layers whose input the graph then quantizes with a trained range ->
    that range (what the export's PyTorch reference must apply, :func:`fake_quantize`).

    The inputs of the ``static`` layers (int8 kernels) in ``ranges``; each of their outputs in ``outputs`` (layer ->
    tensor QDQ quantizes after it) that reaches, through transparent ops only, the input of a layer in ``ranges``:
    a static one, or one of ``others`` (e.g. a ``MatMulNBits`` Linear, which then reads the uint8 values it was
    trained on). A static graph has one range per tensor: layers reading one tensor with different trained ranges
    (attention's query / key / value projections) get their union (:func:`union`), with a warning, since each was
    validated with its own."""
    readers: dict[str, list[str]] = {}
    for name, site in {**others, **static}.items():
        if name in ranges:
            readers.setdefault(site.node.input[0], []).append(name)
    given: dict[str, Range] = {}
    owner: dict[str, str] = {}
    for tensor, names in readers.items():
        given[tensor], owner[tensor] = union([ranges[n] for n in names]), names[0]
        if len({ranges[n] for n in names}) > 1:
            warnings.warn(f"layers {names} read the same tensor {tensor!r} with different trained input ranges "
                          f"{[ranges[n] for n in names]}; a static graph has one range per tensor: they share their "
                          f"union {given[tensor]} (coarser steps than some were trained with; "
                          "activations='dynamic' keeps each layer's input in float)", stacklevel=4)
    used = {n: given[site.node.input[0]] for n, site in static.items() if n in ranges}
    kept = {site.node.input[0] for name, site in static.items() if name in ranges}
    for tensor in outputs.values():
        reached = _through_transparent(graph, tensor)
        if tensor and reached in owner:
            given.setdefault(tensor, given[reached])
            kept.update((tensor, reached))
            used.update(dict.fromkeys(readers[reached], given[reached]))
    return {t: r for t, r in given.items() if t in kept}, used


def union(ranges: Sequence[Range]) -> Range:
    """One uint8 range covering every range of ``ranges`` (``[(0 - z) * s, (255 - z) * s]`` each), in the export's
    own parametrisation (:func:`~._graph.uint8_qparams`); a single range, or equal ones, unchanged."""
    if len(set(ranges)) == 1:
        return ranges[0]
    low = min((QMIN - zero_point) * scale for scale, zero_point in ranges)
    high = max((QMAX - zero_point) * scale for scale, zero_point in ranges)
    return uint8_qparams(low, high)


def _through_transparent(graph: Graph, tensor: str) -> str:
    """The tensor reached from ``tensor`` through a chain of single-reader transparent ops."""
    seen = set()
    while tensor and tensor not in seen:
        seen.add(tensor)
        readers = graph.consumers(tensor)
        if len(readers) != 1 or readers[0].op_type not in TRANSPARENT_OPS:
            break
        tensor = readers[0].output[0]
    return tensor
