"""ONNX graph surgery behind :func:`~lightning_compress.serving.export_onnx`. No Lightning, no torch.

:class:`Graph` wraps a ``ModelProto`` with the few edits the exporter needs (add an initializer, add a node, find
the consumers of a tensor, insert a QuantizeLinear -> DequantizeLinear pair on a tensor) and re-sorts the nodes
topologically on :meth:`Graph.finish`, so new nodes may be appended in any order.

:func:`find_weight` locates the initializer that holds one quantized weight in the graph torch exported: by its
state-dict name, else by value (``w`` itself, ``w.T`` for a ``MatMul``, or ``w`` with each output row multiplied by
a factor: the TorchScript exporter folds an eval-mode BatchNorm into the Conv before it). The codes stay ours;
a folded BatchNorm only multiplies the per-row scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TRANSPARENT_OPS = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


@dataclass
class WeightSite:
    """Where a quantized weight ``w`` (``(out, in, ...)``) lives in the graph."""

    initializer: str
    layout: str  # "same" (the initializer is w), "transposed" (w.T, a MatMul's (in, out) operand)
    row_factor: np.ndarray | None  # initializer == row_factor[:, None, ...] * w (a folded BatchNorm), else None
    node: Any  # the NodeProto that reads it
    others: tuple[Any, ...] = ()  # further readers: each a Gather of the same table (one embedding, several lookups)


class Graph:
    """A mutable view of ``model.graph`` with unique names and a consumer index."""

    def __init__(self, model: Any, onnx: Any) -> None:
        self.model, self.onnx = model, onnx
        self.graph = model.graph
        self.inits = {init.name: init for init in self.graph.initializer}
        self._names = set(self.inits) | {v.name for v in self.graph.input} | {v.name for v in self.graph.output}
        for node in self.graph.node:
            self._names.update(node.output)
            self._names.add(node.name)
        self._qdq: dict[str, str] = {}  # tensor -> its DequantizeLinear output
        self.params: dict[str, tuple[float, int]] = {}  # activation tensor -> (scale, uint8 zero point)
        self.dynamic: dict[str, tuple[str, str, str]] = {}  # tensor -> its DynamicQuantizeLinear outputs

    # ------------------------------------------------------------------------------------------ names and values
    def unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self._names:
            candidate, i = f"{name}_{i}", i + 1
        self._names.add(candidate)
        return candidate

    def array(self, name: str) -> np.ndarray:
        return self.onnx.numpy_helper.to_array(self.inits[name])

    def add_init(self, name: str, value: np.ndarray) -> str:
        name = self.unique(name)
        tensor = self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def remove_init(self, name: str) -> None:
        self.graph.initializer.remove(self.inits.pop(name))

    def add_node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = "", **attrs: Any) -> Any:
        node = self.onnx.helper.make_node(op, list(inputs), list(outputs), name=self.unique(f"lc/{op}"),
                                          domain=domain, **attrs)
        self.graph.node.append(node)
        return node

    def consumers(self, tensor: str) -> list[Any]:
        return [node for node in self.graph.node if tensor in node.input]

    def producer(self, tensor: str) -> Any | None:
        return next((node for node in self.graph.node if tensor in node.output), None)

    def through_identity(self, tensor: str) -> str:
        """The initializer an ``Identity`` chain forwards (the exporter shares equal constants, e.g. zero biases,
        that way), else ``tensor`` itself."""
        seen = set()
        while tensor not in self.inits and tensor not in seen:
            seen.add(tensor)
            producer = self.producer(tensor)
            if producer is None or producer.op_type != "Identity":
                break
            tensor = producer.input[0]
        return tensor

    def is_output(self, tensor: str) -> bool:
        return any(v.name == tensor for v in self.graph.output)

    def rewire(self, old: str, new: str, *, skip: Iterable[Any] = ()) -> None:
        """Every node input reading ``old`` reads ``new`` instead (except the nodes in ``skip``)."""
        skipped = {id(node) for node in skip}
        for node in self.graph.node:
            if id(node) not in skipped:
                for i, name in enumerate(node.input):
                    if name == old:
                        node.input[i] = new

    # ------------------------------------------------------------------------------------------ activations
    def qdq(self, tensor: str, scale: float, zero_point: int) -> str:
        """Insert ``QuantizeLinear -> DequantizeLinear`` (uint8) on ``tensor``; its readers read the dequantized
        copy. Returns the dequantized name (the same pair is reused when asked twice)."""
        if tensor in self._qdq:
            return self._qdq[tensor]
        s = self.add_init(f"{tensor}_scale", np.array(scale, dtype=np.float32))
        z = self.add_init(f"{tensor}_zero_point", np.array(zero_point, dtype=np.uint8))
        quantized, dequantized = self.unique(f"{tensor}_QuantizeLinear"), self.unique(f"{tensor}_DequantizeLinear")
        readers = self.consumers(tensor)
        source = tensor
        if self.is_output(tensor):  # keep the graph output's name: the producer writes a new name instead
            source = self.unique(f"{tensor}_float")
            producer = self.producer(tensor)
            if producer is None:
                raise RuntimeError(f"graph output {tensor!r} has no producer")
            producer.output[list(producer.output).index(tensor)] = source
            self.rewire(tensor, source)
            dequantized = tensor
        self.add_node("QuantizeLinear", [source, s, z], [quantized])
        self.add_node("DequantizeLinear", [quantized, s, z], [dequantized])
        for node in readers:
            for i, name in enumerate(node.input):
                if name == tensor and dequantized != tensor:
                    node.input[i] = dequantized
        self._qdq[tensor] = dequantized
        self.params[tensor] = (scale, zero_point)
        self.params[dequantized] = (scale, zero_point)
        return dequantized

    def propagate_through_transparent_ops(self) -> None:
        """Give the output of each MaxPool / Flatten / Reshape / ... whose input is quantized the same (scale, zero
        point), so ORT runs it on uint8 codes and drops the redundant DequantizeLinear -> QuantizeLinear pairs."""
        changed = True
        while changed:
            changed = False
            for node in self.sorted_nodes():
                if node.op_type in TRANSPARENT_OPS and node.input and node.input[0] in self.params:
                    out = node.output[0]
                    if out not in self._qdq and self.consumers(out):
                        self.qdq(out, *self.params[node.input[0]])
                        changed = True

    # ------------------------------------------------------------------------------------------ finishing
    def sorted_nodes(self) -> list[Any]:
        """The nodes in a topological order (Kahn), stable with respect to the current order."""
        nodes = list(self.graph.node)
        available = set(self.inits) | {v.name for v in self.graph.input} | {""}
        done: list[Any] = []
        pending = nodes
        while pending:
            rest = []
            for node in pending:
                if all(name in available for name in node.input):
                    done.append(node)
                    available.update(node.output)
                else:
                    rest.append(node)
            if len(rest) == len(pending):
                raise RuntimeError(f"the rewritten graph has a cycle or a dangling input at {rest[0].name!r}")
            pending = rest
        return done

    def finish(self) -> Any:
        nodes = self.sorted_nodes()
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = {name for node in nodes for name in node.input}
        for name in [n for n in self.inits if n not in used and not self.is_output(n)]:
            self.remove_init(name)
        return self.model


def find_weight(graph: Graph, key: str, weight: np.ndarray, claimed: set[str]) -> WeightSite | str:
    """The initializer holding ``weight`` (float32, ``(out, in, ...)``) and its reader (or its readers, when all are
    lookups of it as a table), or why not found."""
    candidates = [key] if key in graph.inits else []
    transposed = weight.T if weight.ndim == 2 else None
    for name, init in graph.inits.items():
        dims = tuple(init.dims)
        if name != key and (dims == weight.shape or (transposed is not None and dims == transposed.shape)):
            candidates.append(name)
    for name in candidates:
        if name in claimed:
            continue
        value = graph.array(name)
        if value.dtype != np.float32:
            continue
        site = _compare(name, value, weight, transposed)
        if site is None:
            continue
        readers = graph.consumers(name)
        lookups = all(r.op_type == "Gather" and r.input[0] == name for r in readers)  # e.g. source and target ids
        if len(readers) != 1 and not (readers and lookups):
            return f"its initializer {name!r} is read by {len(readers)} nodes (shared weights are kept as they are)"
        layout, factor = site
        return WeightSite(name, layout, factor, readers[0], tuple(readers[1:]))
    return "no initializer of the exported graph holds this weight (its layer may have been traced away)"


def _compare(
    name: str, value: np.ndarray, weight: np.ndarray, transposed: np.ndarray | None
) -> tuple[str, np.ndarray | None] | None:
    if value.shape == weight.shape and np.array_equal(value, weight):
        return "same", None
    if transposed is not None and value.shape == transposed.shape and np.array_equal(value, transposed):
        return "transposed", None
    if value.shape != weight.shape or weight.ndim < 2:
        return None
    rows_w = weight.reshape(weight.shape[0], -1).astype(np.float64)
    rows_v = value.reshape(value.shape[0], -1).astype(np.float64)
    norm = np.square(rows_w).sum(axis=1)
    factor = np.where(norm > 0, (rows_v * rows_w).sum(axis=1) / np.where(norm > 0, norm, 1.0), 1.0)
    if np.allclose(rows_v, factor[:, None] * rows_w, rtol=1e-5, atol=1e-6 * float(np.abs(rows_v).max() + 1e-30)):
        return "same", factor
    return None


def uint8_qparams(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 activation range (widened to contain 0, like ORT's MinMax)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0
    if scale <= 0.0 or not np.isfinite(scale):
        return 1.0, 0
    zero_point = int(np.clip(np.round(-low / scale), 0, 255))
    return float(np.float32(scale)), zero_point
