"""What a latency plan is built from and what it delivers: the problem (unit analysis, Fisher scores, candidates,
the latency table with its int8 rows, the bytes and MACs the layers cost) and the delivered model for one plan
(compacted, BatchNorm statistics refreshed, int8 layers quantized, timed in ONNX Runtime against the dense model,
its file and MACs measured). :mod:`.latency_budget` solves, corrects and verifies with them. No Lightning import.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.adaptive.costs import file_bytes, model_macs, positions
from lightning_compress.adaptive.fisher import diagonal_fisher
from lightning_compress.adaptive.int8_latency import (
    as_served,
    calibration_inputs,
    carry_input_ranges,
    int8_scores,
    onnx_graph,
    quantize_int8,
)
from lightning_compress.adaptive.latency import Timings, build_table, graph_ratio, measured_ratio
from lightning_compress.adaptive.latency_plan import CapCosts, LatencyProblem, LayerCost
from lightning_compress.adaptive.latency_widths import Widths, apply_widths
from lightning_compress.adaptive.rivals import against_float, clearly_lower
from lightning_compress.adaptive.units import (
    LAYERS,
    UnitCandidate,
    families,
    family_candidates,
    unit_masks,
    unit_scores,
)
from lightning_compress.core.accounting import state_bytes
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.export import save_float
from lightning_compress.structure.compaction import compact
from lightning_compress.structure.dependency import find_unit_groups


@dataclass
class Delivered:
    plan: dict[str, UnitCandidate]
    model: nn.Module
    ratio: float  # measured latency / dense latency
    predicted: float  # predicted ratio
    seconds: float  # measured per run
    metric: float | None = None
    int8: frozenset[str] = field(default_factory=frozenset)  # layers on int8 kernels (the model carries codes)
    file_bytes: int | None = None  # measured, when a size / MACs cap asked for it
    macs: int | None = None  # counted per example, likewise
    loss: float = 0.0  # predicted loss increase of the plan
    note: str = ""  # what else was measured, for the steps
    widths: dict[str, str] = field(default_factory=dict)  # layers stored narrower than int8 / weight-only: label

    def fits(self, latency: float, caps: tuple[int | None, int | None]) -> bool:
        """Measured within ``latency`` and the (bytes, MACs) ``caps``."""
        size, macs = caps
        return self.ratio <= latency and (size is None or (self.file_bytes is not None and self.file_bytes <= size)) \
            and (macs is None or (self.macs is not None and self.macs <= macs))


def problem_of(model: nn.Module, example: Tensor, shape: tuple[int, ...], threads: int, batches: Sequence[Any],
               forward: Callable[[nn.Module, Any], Any], loss_fn: Callable[[Any, Any], Tensor] | None,
               int8: bool = False, costs: bool = False, units: bool = True,
               timings: Timings | None = None) -> LatencyProblem:
    """Unit analysis, Fisher scores per unit (and per layer at int8 with ``int8``), candidates, the latency table
    they need (with int8 rows, timed by ``timings``: :func:`~.latency.build_table`'s), and with ``costs`` what bytes
    and MACs the dense model and its layers cost."""
    groups = find_unit_groups(model, example)
    members = families(groups)
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if isinstance(m, LAYERS) and isinstance(m.weight, Tensor)}
    weights = {n: m.weight for n, m in layers.items()}
    fisher = diagonal_fisher(model, weights, batches, forward, loss_fn)
    scores = {name: unit_scores(groups[name], family, modules, fisher) for name, family in members.items()}
    candidates = {name: family_candidates(name, scores[name]) for name in members}
    outputs: dict[str, list[int]] = {}
    inputs: dict[str, list[int]] = {}
    for name, options in candidates.items():
        for member in members[name]:
            outputs.setdefault(member, []).extend(c.kept for c in options)
        for consumer, repeat, _ in groups[name].consumers:
            if consumer in modules and isinstance(modules[consumer], LAYERS):
                fan_in = int(modules[consumer].weight.shape[1])
                inputs.setdefault(consumer, []).extend(fan_in - (c.units - c.kept) * repeat for c in options)
    table = build_table(model, shape, threads, outputs, inputs, int8=int8, timings=timings)
    problem = LatencyProblem(candidates, members, groups, scores, table, units=units)
    problem.int8_scores = int8_scores({n: layers[n] for n in table.int8}, fisher)
    if costs:
        where = positions(model, layers, batches[0], forward)
        per_layer = {n: LayerCost(layers[n].weight[0, 0].numel(), where[n], getattr(layers[n], "bias", None)
                                  is not None) for n in table.full}
        problem.costs = CapCosts(per_layer, sum(state_bytes(model).values()), model_macs(model, batches[0], forward))
    return problem


def refresh_batchnorm(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (a plain average over them), the rest of the
    model in eval mode. Removing units changes what the later BatchNorms see; their dense statistics then shift
    every channel (adaptive BatchNorm, as EagleEye evaluates pruned candidates)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    model.eval()
    saved = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
        norm.train()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum
        model.eval()


def delivered_bytes(model: nn.Module) -> int:
    """Bytes of the file the delivered model is written as: ``save_quantized`` (it carries codes), else
    ``save_float``."""
    if carried(model) is not None:
        return file_bytes(model)
    with tempfile.TemporaryDirectory() as folder:
        return os.path.getsize(save_float(model, os.path.join(folder, "plan.safetensors")))


def deliver(model: nn.Module, problem: LatencyProblem, plan: dict[str, UnitCandidate], example: Tensor,
            shape: tuple[int, ...], threads: int, batches: Sequence[Any] = (),
            forward: Callable[[nn.Module, Any], Any] | None = None, int8: frozenset[str] = frozenset(),
            count: bool = False, timings: Timings | None = None,
            widths: Callable[[nn.Module, frozenset[str]], Widths | None] | None = None) -> Delivered | None:
    """The compacted copy of ``model`` for ``plan`` (its BatchNorm statistics refreshed on ``batches`` when a unit
    was removed), its ``int8`` layers quantized, timed against ``model`` in turns: the float graph, or with int8
    layers the graph ``export_onnx(activations="static")`` writes (calibrated on ``batches``). ``count``: its file
    bytes and MACs measured too. ``timings``: :func:`~.latency.build_table`'s. ``widths``: plans every layer's
    width on the compacted float copy (:func:`~.latency_widths.plan_widths`); None when none fits, and then nothing
    is timed and None returned."""
    masks = unit_masks(plan, problem.scores, problem.members)
    compacted = compact(model, masks, example).model if masks else copy.deepcopy(model)
    if masks and batches and forward is not None:
        refresh_batchnorm(compacted, batches, forward)
    compacted.eval()
    note, chosen = "", None
    if widths is not None:
        chosen = widths(compacted, int8)
        if chosen is None:
            return None
        apply_widths(compacted, chosen)
    else:
        quantize_int8(compacted, int8)
    if int8 or (chosen is not None and carried(compacted) is not None):
        graph, report = onnx_graph(compacted, calibration_inputs(batches))
        carry_input_ranges(compacted, report)  # its export and its metric read uint8 inputs, as timed
        ratio, _, seconds = graph_ratio(model, graph, shape, threads, timings=timings)
        note = (f"; its static graph (uint8 inputs) agrees with the float-input model on {report.argmax_agreement:.3f} "
                "of argmaxes")
    else:
        ratio, _, seconds = measured_ratio(model, compacted, shape, threads, timings=timings)
    loss = problem.loss(plan, int8) if chosen is None else problem.loss(plan) + chosen.loss
    delivered = Delivered(plan, compacted, ratio, problem.predict(plan, int8) / problem.table.dense, seconds,
                          int8=int8, loss=loss, widths={} if chosen is None else chosen.labels())
    if count and forward is not None:
        delivered.file_bytes, delivered.macs = delivered_bytes(compacted), model_macs(compacted, batches[0], forward)
        note += f"; file {delivered.file_bytes} bytes, {delivered.macs} MACs per example"
    delivered.note = note
    return delivered


def closest_to_float(model: nn.Module, plans: list[Delivered], batches: Sequence[Any],
                      forward: Callable[[nn.Module, Any], Any], steps: list[str]) -> Delivered:
    """Without a metric, the plans that passed (the lowest predicted first) compared as served on the calibration
    batches against ``model``'s float outputs (:func:`~.rivals.against_float`): another replaces the first only
    when clearly lower (:func:`~.rivals.clearly_lower`, the size path's rule). The predicted loss prices narrow
    codes and removed units on two Fisher estimates, so it alone does not choose between them. With a ``loss_fn``
    and no metric nothing is compared, as in the size path (a sampled loss measures nothing)."""
    proxy = against_float(model, batches, forward)
    values = []
    for plan in plans:
        with as_served(plan.model):
            values.append(proxy.samples(plan.model))
    best = 0
    for index in range(1, len(plans)):
        if clearly_lower(values[best], values[index]):
            best = index
    steps.append(f"no metric: {len(plans)} passing plans compared on {proxy.describes} (" +
                 ", ".join(f"{float(v.mean()):.4g}" for v in values) + f"); delivered the plan ranked {best + 1} "
                 "by predicted loss")
    return plans[best]
