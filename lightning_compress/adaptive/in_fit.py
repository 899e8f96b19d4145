"""Compress to a budget inside a fit: the pure half of ``AdaptiveCompression`` (the callback coordinates). No
Lightning import.

- :func:`~.caps.budget_caps` (in :mod:`.caps`): the budget for this model, refused at once below its floor, in
  ``setup`` before any training step.
- :class:`SparsityPlanner`: per-layer sparsity targets from the gradient statistics. ``E[g^2] = mean^2 + var`` of
  each weight is the diagonal Fisher (:func:`statistics_fisher`), the score :mod:`.candidates` uses, so the same
  candidates (sparsity x width x granularity) and the same knapsack (:mod:`.plan`) plan the fit. Only the
  sparsities are read from that plan (made on a coarser grid of widths, :data:`PLAN_WIDTHS`, with min/max ranges,
  since it runs at every event): the widths are planned again at the end, on the masks the fit reached. For the
  same reason a layer with more than :data:`PLAN_ELEMENTS` weights is scored on evenly spaced rows holding about
  that many (:func:`sampled_candidates`), its bytes, MACs and scores scaled up by the rows left out: the candidates
  (sorting by saliency, quantizing, pricing the sparse layout) were most of each event's planning cost, and the
  sampled plan is an estimate the end of the fit does not rely on (it plans again, exactly, on every row). The
  knapsack cuts the caps into :data:`PLAN_BUCKETS` units, fewer than ``compress()``'s, for the same reason.
  Sparsity is chosen where it pays in MACs or in the candidates' bytes; where it pays in neither, its predicted
  loss keeps it out of the plan.
- MACs, honestly: a candidate's MACs are its nonzero weights times the positions each is applied at
  (:mod:`.candidates`; :func:`~.costs.delivered_macs` counts the delivered model the same way), which is what a
  sparse kernel executes. The delivered model runs on dense kernels (PyTorch, ONNX Runtime's Conv / Gemm), which
  multiply the zeros as well: under a MACs budget, unstructured sparsity saves MACs only where a sparse kernel runs
  the model. Whole units remove MACs on any kernel; the fit plans them for a latency budget
  (:mod:`.in_fit_units`), not yet for a MACs budget (``compress()`` plans units under MACs caps together with a
  latency budget: :mod:`.latency_plan`).
- :class:`BudgetRun`: a :class:`~lightning_compress.pruning.run.PruningRun` whose schedule is a ramp of progress
  (0 -> 1): at each event the plan is made again from the statistics then, and each layer aims at its own target
  times the progress, so every layer ramps to its own target while the overall sparsity follows the schedule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_compress.adaptive.candidates import SPARSITIES, Candidate, layer_candidates
from lightning_compress.adaptive.caps import Caps
from lightning_compress.adaptive.costs import aliases, fixed_bytes
from lightning_compress.adaptive.plan import FLOOR_SPARSITY, Problem
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.pruning.planner import plan_masks
from lightning_compress.pruning.run import PruningRun
from lightning_compress.pruning.statistics import GradientStatistics
from lightning_compress.quantization.coverage import QUANT_MODULE_TYPES, layer_weight, select_layers, weight_key

T = TypeVar("T")

PLAN_WIDTHS = (2, 4, 8, FLOAT_BITS)  # the fit plans sparsity on a coarser grid of widths (planned at each event)
PLAN_ELEMENTS = 16384  # a larger layer is scored in the fit on evenly spaced rows of about this many weights: on the
# SmallCNN / MNIST-5k job the 12 events' plans were the same as with every row (8192: one event differed)
PLAN_MIN_ROWS = 8  # never fewer rows than this in a sample (the score is a sum over rows of unequal importance)
PLAN_BUCKETS = 1024  # the knapsack's resolution at the events (compress() uses 4096): the same 12 plans on that job


def statistics_fisher(stats: GradientStatistics) -> dict[str, Tensor]:
    """Per tracked layer, ``E[g^2] = mean^2 + var`` over the counted steps: the diagonal Fisher."""
    return {name: mean.square() + std.square()
            for name, mean, std in zip(stats.names, stats.weight_mean(), stats.weight_std())}


@dataclass
class SparsityPlanner:
    """Plans per-layer sparsity for ``model``'s tracked layers under ``caps``. Every other quantizable layer (an
    embedding; a Linear / Conv left out by ``exclude=`` / ``include=`` / ``module_types=``) is quantized at the end
    of the fit as well, so it is planned in the same problem as ``budget_caps`` prices it: its candidates at
    sparsity 0 (never pruned), scored with the tracked layers' mean ``E[g^2]`` per weight (the fit keeps no
    statistics for it; the end of the fit plans its width again on its own Fisher). ``fallback``: why the last call
    returned the largest sparsity everywhere (no plan within the caps), else None."""

    model: nn.Module
    modules: dict[str, nn.Module]  # the tracked layers
    caps: Caps
    calibration: str = "minmax"  # only the sparsities are read: the widths' clipping search is left to the end
    widths: tuple[int, ...] = PLAN_WIDTHS
    elements: int | None = PLAN_ELEMENTS  # None: every layer scored on all its rows
    buckets: int = PLAN_BUCKETS
    fallback: str | None = None

    def __call__(self, fisher: Mapping[str, Tensor]) -> dict[str, float]:
        """Layer -> sparsity of the plan with the smallest predicted loss within the caps; with no plan within
        both caps, within the MACs cap alone; else the largest sparsity everywhere (``fallback`` says so)."""
        layers = select_layers(self.model, QUANT_MODULE_TYPES)[0]
        untracked = {n: m for n, m in layers.items() if n not in self.modules}
        modules = {**self.modules, **untracked}
        keys = {name: weight_key(name, module) for name, module in modules.items()}
        weights = {name: layer_weight(name, module).detach() for name, module in modules.items()}
        where, self.fallback = self.caps.where, None
        scores = {n: fisher[n].to(weights[n].device) for n in self.modules}
        mean = sum(float(f.double().sum()) for f in scores.values()) / max(sum(f.numel() for f in scores.values()), 1)
        candidates = {n: sampled_candidates(n, modules[n], weights[n],
                                            scores[n] if n in scores else torch.full_like(weights[n], mean),
                                            where.get(n, 0.0), count, self.calibration, self.widths, self.elements,
                                            SPARSITIES if n in self.modules else (0.0,))
                      for n, count in aliases(self.model, keys).items()}
        fixed = fixed_bytes(self.model, keys)
        size_cap, macs_cap = self.caps.size_cap, self.caps.macs_cap
        tries = [(size_cap, macs_cap)] + ([(None, macs_cap)] if macs_cap is not None else [])
        for caps in tries:
            plan = Problem(candidates, fixed, self.caps.other_macs, *caps, buckets=self.buckets).choose(0)
            if plan is not None:  # a candidate prunes the weights already zero first: never below what they are
                return {name: max(plan[name].sparsity, zero_fraction(weights[name])) for name in self.modules}
        self.fallback = (f"no plan of sparsities (untracked layers {sorted(untracked)} at sparsity 0) is within the "
                         f"caps (size {size_cap}, MACs {macs_cap}): every tracked layer planned at the largest "
                         f"sparsity {FLOOR_SPARSITY}")
        return {name: FLOOR_SPARSITY for name in self.modules}


def sampled_rows(weight: Tensor, elements: int | None = PLAN_ELEMENTS) -> Tensor | None:
    """Indices of evenly spaced rows (output units) of ``weight`` holding about ``elements`` weights, first and last
    row included, at least :data:`PLAN_MIN_ROWS`; None when that would be every row."""
    rows = weight.shape[0]
    if elements is None or weight.dim() == 0 or rows == 0:
        return None
    take = max(PLAN_MIN_ROWS, math.ceil(elements / max(weight[0].numel(), 1)))
    return None if take >= rows else torch.linspace(0, rows - 1, take, device=weight.device).round().long()


def sampled_candidates(name: str, module: nn.Module, weight: Tensor, fisher: Tensor, positions: float, aliases: int,
                       calibration: str, widths: Sequence[int], elements: int | None = PLAN_ELEMENTS,
                       sparsities: Sequence[float] = SPARSITIES) -> list[Candidate]:
    """:func:`~.candidates.layer_candidates` of the rows :func:`sampled_rows` picks, with bytes, MACs and scores
    multiplied by all rows over the rows sampled (an estimate; every row when the layer is small)."""
    rows = sampled_rows(weight, elements)
    if rows is None:
        return layer_candidates(name, module, weight, fisher, positions, aliases, calibration, widths=widths,
                                sparsities=sparsities)
    factor = weight.shape[0] / len(rows)
    return [replace(c, nbytes=round(c.nbytes * factor), macs=round(c.macs * factor), score=c.score * factor)
            for c in layer_candidates(name, module, weight[rows], fisher[rows], positions, aliases, calibration,
                                      widths=widths, sparsities=sparsities)]


def rank_zero() -> bool:
    """Whether this process is the process group's rank zero (True outside a distributed run): the rank whose plan
    the callback's ``broadcast`` (``trainer.strategy.broadcast(..., src=0)``) gives every rank."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


class RankZeroError(RuntimeError):
    """Raised on the ranks other than zero when work only rank zero does failed there (its error quoted)."""


def from_rank_zero(share: Callable[[Any], Any], work: Callable[[], T], what: str) -> T:
    """``work()`` on rank zero alone (an ONNX export, ORT timings), its value on every rank through ``share`` (the
    callback's broadcast; every rank calls this, once). A failure there raises on every rank: rank zero's own error,
    a :class:`RankZeroError` quoting it on the others. Without this, rank zero raised alone and the other ranks
    waited in the broadcast until the job was killed."""
    value: Any = None
    error: Exception | None = None
    if rank_zero():
        try:
            value = work()
        except Exception as err:
            error = err
    value, failed = share((value, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if failed is not None:
        raise RankZeroError(f"{what} failed on rank zero, so every rank stops: {failed}")
    return value


def zero_fraction(weight: Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)


def overall(plan: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """The plan's fraction of all tracked weights pruned."""
    total = sum(sizes.values())
    return sum(plan[n] * sizes[n] for n in sizes) / max(total, 1)


def ramped(plan: Mapping[str, float], target: float, planned: float) -> dict[str, float]:
    """Per-layer targets when the overall sparsity should be ``target`` on the way to the plan's ``planned``: each
    layer at its planned sparsity times the same progress ``target / planned``."""
    progress = 0.0 if planned <= 0 else min(1.0, target / planned)
    return {name: sparsity * progress for name, sparsity in plan.items()}


class BudgetRun(PruningRun):
    """The fit's pruning toward per-layer targets (see the module docstring). ``planner`` and ``broadcast`` (every
    rank takes rank zero's plan, which rank zero alone makes) are set once the fit starts; ``schedule`` ramps
    progress from 0 to 1."""

    planner: Callable[[Mapping[str, Tensor]], dict[str, float]] | None = None
    broadcast: Callable[[Any], Any] = staticmethod(lambda plan: plan)
    plan_by_layer: dict[str, float]
    planned_at: int | None
    replans: int
    fell_back: str | None  # the planner's reason when its last plan was the floor fallback (warned once)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan_by_layer, self.planned_at, self.replans, self.fell_back = {}, None, 0, None

    @property
    def planned(self) -> float:
        sizes = {n: w.numel() for n, w in zip(self.layers.names, self.layers.weights())}
        return overall(self.plan_by_layer, sizes) if self.plan_by_layer else 0.0

    def replan(self) -> None:
        """The plan again from the statistics now: rank zero plans and every rank takes its plan (and what it said
        of a fallback); the other ranks solve nothing they would drop (:func:`rank_zero`)."""
        if self.planner is None or self.stats is None or self.stats.count == 0:
            return
        mine = (self.planner(statistics_fisher(self.stats)), getattr(self.planner, "fallback", None)) \
            if rank_zero() else None
        plan, fallback = self.broadcast(mine)
        self.plan_by_layer = {n: float(s) for n, s in plan.items()}
        self.replans += 1
        if fallback and not self.fell_back:
            warnings.warn(f"AdaptiveCompression: {fallback}", stacklevel=2)
        self.fell_back = fallback

    def event(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """:meth:`PruningRun.event`; the entry's note says when the plan it pruned toward was the floor fallback."""
        entry = super().event(*args, **kwargs)
        if entry is not None and self.fell_back:
            entry["note"] = "; ".join(filter(None, [entry.get("note"), self.fell_back]))
        return entry

    def _target(self, tick: int) -> float | None:
        if self.schedule is None:
            return None
        if tick != self.planned_at:  # once per event (event() asks twice)
            self.planned_at = tick
            self.replan()
        progress = self.schedule.target_by(tick)
        if progress is None:
            return None
        target = self.planned * progress
        cap = self.controller.sparsity_cap
        return target if cap is None else min(target, cap)

    def plan(self, target: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
        targets = ramped(self.plan_by_layer, target or 0.0, self.planned)
        return plan_masks(self.config, self.state.model, self.layers, self.stats, self.state.masks,
                          self.state.unit_masks, self.state.groups, target, layer_targets=targets)

    def reached(self) -> dict[str, float]:
        return self.layers.layer_mask_sparsity(self.state.masks)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "plan": dict(self.plan_by_layer), "planned_at": self.planned_at,
                "replans": self.replans}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.plan_by_layer = {str(n): float(s) for n, s in dict(state.get("plan", {})).items()}
        self.planned_at, self.replans = state.get("planned_at"), int(state.get("replans", 0))


def shortfall(plan: Mapping[str, float], reached: Mapping[str, float], tolerance: float = 5e-3) -> dict[str, Any]:
    """Layers whose reached sparsity is below their planned one by more than ``tolerance`` (refused events)."""
    return {n: (plan[n], reached.get(n, 0.0)) for n in plan if reached.get(n, 0.0) < plan[n] - tolerance}

