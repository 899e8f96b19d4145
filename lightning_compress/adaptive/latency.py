"""Latency measured in ONNX Runtime on this machine: whole models, and a per-layer table that predicts them
(HALP / NetAdapt style). No Lightning import.

- :func:`float_graph`: the model as a float ONNX graph with a fixed input shape (what ORT would serve: it folds
  each BatchNorm into its Conv and fuses the ReLU).
- :func:`measure`: several graphs timed in alternation (a, b, c, a, b, c, ...), so a burst of load from another
  process hits all of them alike; the median per graph. With one intra-op thread ORT runs each node on the calling
  thread, so the clock is that thread's CPU time (what other processes do to the wall clock does not count); with
  more threads the work is spread over ORT's pool and the clock is the wall clock.
- :class:`LatencyTable`: per Linear / Conv layer, its latency as a one-layer graph at its real input shape, for each
  number of output units and input columns the candidates can give it. Only the rows ``(out, full in)`` and
  ``(full out, in)`` are measured; ``T(out, in)`` is taken as ``T(out, full) * T(full, in) / T(full, full)``
  (separable). The whole model is predicted as its measured dense latency times the layers' summed time in the
  plan over their summed dense time (:meth:`LatencyTable.predict`; the other operations, pooling / adds / fused
  activations, shrink with the channels they carry; a one-layer graph's own overhead makes the layers' sum exceed
  a small model's whole time, so "dense minus the layers plus the plan" has nothing left to stand for the rest).
  ``benchmarks/bench_adaptive_latency.py`` reports how well each form predicts; :mod:`.latency_budget` measures
  every delivered model anyway.
- int8 rows (``build_table(..., int8=True)``): the same ``(out, in)`` rows again, each layer at 8-bit codes as
  ``export_onnx`` writes it (:func:`~.int8_latency.int8_layer_graph`: ``QLinearConv`` / ``QGemm``), timed in the
  same alternation as the float rows; a layer the export cannot put on an integer operator has none. A one-layer
  graph's time does not add up inside a model: there, consecutive int8 layers pass uint8 tensors to each other,
  while an int8 layer between float ones pays quantize / dequantize and layout changes (ORT runs float convolutions
  in a blocked layout and ``QLinearConv`` in NHWC: one int8 convolution in the middle of a float CNN made it
  slower than all float). So the dense model itself is also timed with a few *sets* of int8 layers
  (:attr:`LatencyTable.int8_models`: every layer that has int8 rows, and those whose int8 row is faster than its
  float one), and a plan with one of those sets is predicted like the float one, from that set's measured whole
  model: ``T_set * sum(layer times in the plan) / sum(layer times dense)``, int8 rows for the set's layers.
"""

from __future__ import annotations

import io
import math
import statistics
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress.adaptive.int8_latency import int8_layer_graph, int8_model_graph
from lightning_compress.core.modules import weight_of
from lightning_compress.serving._runtime import require_onnx, session

ROUNDS = 9  # timed runs per graph (the median is kept); each round runs every graph once, in turn
WARMUP = 2  # untimed runs per graph first (ORT allocates its buffers on the first runs)
SESSION_BYTES = 2**30  # what the sessions timed in turn may hold at once (their inputs times BUFFERS), about
BUFFERS = 3  # an input, an output and one intermediate buffer per session
TABLE_ROUNDS = 5  # per-layer graphs are many and small: fewer rounds
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Timings = Callable[..., dict[str, float]]  # measure()'s signature: (graphs, shapes, threads, rounds=, warmup=)


def float_graph(model: nn.Module, shape: Sequence[int]) -> bytes:
    """``model`` (eval mode, float) as ONNX bytes taking one float input of exactly ``shape``."""
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=17,  # type: ignore[arg-type]
                              input_names=["input"], output_names=["output"], do_constant_folding=True)
    finally:
        model.train(training)
    return buffer.getvalue()


def _clock(threads: int) -> Callable[[], float]:
    return time.thread_time if threads == 1 else time.perf_counter


def measure(graphs: Mapping[str, bytes], shapes: Mapping[str, Sequence[int]], threads: int, rounds: int = ROUNDS,
            warmup: int = WARMUP) -> dict[str, float]:
    """Median seconds per run of each graph (its input of ``shapes[name]``), the graphs run in alternation. A
    session keeps its buffers while it lives, so a table of many graphs is timed in turns by groups whose inputs,
    counted :data:`BUFFERS` times, stay within :data:`SESSION_BYTES`, each group's sessions released before the next
    group's are made. A layer's rows (the names sharing the part before the first ``:``, e.g. its float and int8
    rows) stay in one group, and the first graph is timed in every group: each later group's times are scaled by
    what it measured there against the first group, so load that changed between groups does not move the rows
    apart."""
    _, ort = require_onnx()
    clock, seconds = _clock(threads), dict[str, float]()
    groups = _groups(shapes, list(graphs))
    reference = groups[0][0] if groups else ""
    for index, group in enumerate(groups):
        timed = group if index == 0 or reference in group else [reference, *group]
        runs = {}
        for name in timed:
            sess = session(graphs[name], ort, threads=threads)
            feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(tuple(shapes[name]),
                                                                                        dtype=np.float32)}
            runs[name] = (sess, feed)
        del sess, feed  # only `runs` holds this group's sessions: they go before the next group's are made
        samples: dict[str, list[float]] = {name: [] for name in timed}
        for round_ in range(warmup + rounds):
            for name, (sess, feed) in runs.items():
                start = clock()
                sess.run(None, feed)
                if round_ >= warmup:
                    samples[name].append(clock() - start)
        del runs, sess, feed
        medians = {name: statistics.median(values) for name, values in samples.items()}
        scale = 1.0 if index == 0 else seconds[reference] / medians[reference]
        seconds.update({name: value * scale for name, value in medians.items() if index == 0 or name != reference})
    return seconds


def _groups(shapes: Mapping[str, Sequence[int]], names: list[str]) -> list[list[str]]:
    """``names`` in order, cut into groups whose float32 inputs, :data:`BUFFERS` times each, fit
    :data:`SESSION_BYTES`, never between two names of one layer (the same part before the first ``:``); a layer
    larger than that alone is a group of its own."""
    layers: list[list[str]] = []
    for name in names:
        if layers and ":" in name and layers[-1][0].split(":")[0] == name.split(":")[0]:
            layers[-1].append(name)
        else:
            layers.append([name])
    groups: list[list[str]] = [[]]
    held = 0
    for layer in layers:
        need = sum(BUFFERS * 4 * math.prod(shapes[name]) for name in layer)
        if groups[-1] and held + need > SESSION_BYTES:
            groups.append([])
            held = 0
        groups[-1].extend(layer)
        held += need
    return [group for group in groups if group]


def layer_inputs(model: nn.Module, shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The input shape of every Linear / Conv layer of ``model`` fed one input of ``shape`` (a layer called twice
    keeps its first call's)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                shapes.setdefault(name, tuple(args[0].shape))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(*shape))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return shapes


def resized_layer(module: nn.Module, outputs: int, inputs: int) -> nn.Module:
    """A fresh layer like ``module`` (kernel, stride, padding, bias) with ``outputs`` units and ``inputs`` columns."""
    if isinstance(module, nn.Linear):
        return nn.Linear(inputs, outputs, bias=module.bias is not None)
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"a latency table times Linear / Conv layers, got {type(module).__name__}")
    conv = type(module)
    if module.groups != 1:
        raise ValueError(f"grouped convolutions (groups={module.groups}) have no latency table")
    return conv(inputs, outputs, module.kernel_size, module.stride, module.padding,  # type: ignore[arg-type]
                module.dilation, 1, module.bias is not None, module.padding_mode)  # type: ignore[arg-type]


def _channel_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


@dataclass
class LatencyTable:
    """Seconds of each layer as a one-layer graph: ``times[layer][(outputs, inputs)]`` (see the module docstring).
    ``full[layer]``: its dense ``(outputs, inputs)``; ``dense``: the whole dense model, measured; ``rest``: what the
    layers' dense times leave of it (the other operations)."""

    full: dict[str, tuple[int, int]]
    times: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    dense: float = 0.0
    graphs: int = 0  # one-layer graphs measured (float and int8)
    int8: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)  # the same rows at int8 codes
    int8_models: dict[frozenset[str], float] = field(default_factory=dict)  # the dense model with a set int8

    @property
    def rest(self) -> float:
        return max(0.0, self.dense - sum(self.time(n, *self.full[n]) for n in self.full))

    def time(self, layer: str, outputs: int, inputs: int, int8: bool = False) -> float:
        """``T(outputs, inputs)``, separable from the measured rows (of the int8 rows with ``int8``)."""
        full_out, full_in = self.full[layer]
        table = self.int8[layer] if int8 else self.times[layer]
        if (outputs, inputs) in table:
            return table[(outputs, inputs)]
        dense = table[(full_out, full_in)]
        return table[(outputs, full_in)] * table[(full_out, inputs)] / max(dense, 1e-12)

    def predict(self, sizes: Mapping[str, tuple[int, int]], mode: str = "scaled",
                int8: Collection[str] = ()) -> float:
        """The whole model's seconds with each layer at ``sizes[layer]`` (absent: dense), the layers in ``int8``
        at their int8 rows. ``"scaled"``: the dense model's measured time times the layers' summed time in the plan
        over theirs dense (the other operations shrink in proportion); ``"additive"``: the other operations at their
        dense cost, the layers' times added. An ``int8`` set measured whole (:attr:`int8_models`) scales from its
        own measurement; another set from the float dense model's."""
        layers = sum(self.time(n, *sizes.get(n, self.full[n]), n in int8) for n in self.full)
        if mode == "additive":
            return self.rest + layers
        whole = self.int8_models.get(frozenset(int8)) if int8 else None
        if whole is None:
            return self.dense * layers / max(sum(self.time(n, *self.full[n]) for n in self.full), 1e-12)
        return whole * layers / max(sum(self.time(n, *self.full[n], n in int8) for n in self.full), 1e-12)


def build_table(model: nn.Module, shape: Sequence[int], threads: int, outputs: Mapping[str, Sequence[int]],
                inputs: Mapping[str, Sequence[int]], rounds: int = TABLE_ROUNDS, int8: bool = False,
                timings: Timings | None = None) -> LatencyTable:
    """Measure the dense model and, per layer, the one-layer graphs at every count in ``outputs[layer]`` (full
    inputs) and ``inputs[layer]`` (full outputs); layers absent from both are timed dense only. ``int8``: every
    such row also at int8 codes (:attr:`LatencyTable.int8`). ``timings``: what times the graphs (default
    :func:`measure`; e.g. rank zero's timings on every rank)."""
    real = layer_inputs(model, shape)
    modules = dict(model.named_modules())
    table = LatencyTable(full={})
    graphs: dict[str, bytes] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    keys: dict[str, tuple[str, tuple[int, int]]] = {}
    no_int8: set[str] = set()
    for name, in_shape in real.items():
        module = modules[name]
        if getattr(module, "groups", 1) != 1:
            continue
        axis = _channel_axis(module)
        full = (int(weight_of(module, name).shape[0]), int(in_shape[axis]))
        table.full[name] = full
        pairs = {full} | {(o, full[1]) for o in outputs.get(name, ())} | {(full[0], i) for i in inputs.get(name, ())}
        for out, cols in sorted(pairs):
            key = f"{name}:{out}x{cols}"
            layer_shape = list(in_shape)
            layer_shape[axis] = cols
            with torch.no_grad():
                layer = resized_layer(module, out, cols)
                graphs[key] = float_graph(layer, layer_shape)
            quantized = int8_layer_graph(layer, layer_shape) if int8 and name not in no_int8 else None
            shapes[key], keys[key] = tuple(layer_shape), (name, (out, cols))
            if quantized is not None:
                graphs[f"{key}:int8"], shapes[f"{key}:int8"] = quantized, tuple(layer_shape)
            elif int8:
                no_int8.add(name)  # a layer lacking one int8 row gets none: it is never chosen int8
    graphs["<model>"], shapes["<model>"] = float_graph(model, shape), tuple(shape)
    seconds = (timings or measure)(graphs, shapes, threads, rounds=rounds)
    table.dense = seconds.pop("<model>")
    for key, value in seconds.items():
        name, pair = keys[key.removesuffix(":int8")]
        if name in no_int8 and key.endswith(":int8"):
            continue
        (table.int8 if key.endswith(":int8") else table.times).setdefault(name, {})[pair] = value
    table.graphs = len(seconds)
    if table.int8:
        _time_int8_models(model, shape, threads, rounds, table, timings or measure)
    return table


def _time_int8_models(model: nn.Module, shape: Sequence[int], threads: int, rounds: int, table: LatencyTable,
                      timings: Timings) -> None:
    """:attr:`LatencyTable.int8_models`: the dense model with every int8-able layer int8, and with those whose int8
    row is faster than the float one, timed in turns with the float dense model (scaled to its first measurement)."""
    every = frozenset(table.int8)
    faster = frozenset(n for n in every if table.time(n, *table.full[n], True) < table.time(n, *table.full[n]))
    sets = {group for group in (every, faster) if group}
    graphs = {"<model>": float_graph(model, shape)}
    for group in sets:
        graphs[",".join(sorted(group))] = int8_model_graph(model, group, shape)
    seconds = timings(graphs, dict.fromkeys(graphs, tuple(shape)), threads, rounds=rounds)
    dense = seconds.pop("<model>")
    for group in sets:
        table.int8_models[group] = table.dense * seconds[",".join(sorted(group))] / dense


def measured_ratio(dense: nn.Module, model: nn.Module, shape: Sequence[int], threads: int,
                   rounds: int = ROUNDS, timings: Timings | None = None) -> tuple[float, float, float]:
    """(``model``'s latency / ``dense``'s, dense seconds, model seconds), the two whole models timed in turns
    (``timings``: as :func:`build_table`'s)."""
    return graph_ratio(dense, float_graph(model, shape), shape, threads, rounds, timings)


def graph_ratio(dense: nn.Module, graph: bytes, shape: Sequence[int], threads: int,
                rounds: int = ROUNDS, timings: Timings | None = None) -> tuple[float, float, float]:
    """:func:`measured_ratio` of an ONNX ``graph`` (e.g. the delivered model as ``export_onnx`` writes it) against
    ``dense`` as a float graph."""
    seconds = (timings or measure)({"dense": float_graph(dense, shape), "model": graph},
                                   {"dense": shape, "model": shape}, threads, rounds=rounds)
    return seconds["model"] / seconds["dense"], seconds["dense"], seconds["model"]
