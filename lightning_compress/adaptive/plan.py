"""The planning problem (every layer's candidates, what the rest of the model costs, the caps) and its solution:
one candidate per layer, the smallest summed (corrected) score within the caps. No Lightning import."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_compress.adaptive.candidates import SPARSITIES, WIDTHS, Candidate, prune
from lightning_compress.adaptive.knapsack import BUCKETS, solve, solve_two
from lightning_compress.quantization import sparse_layout
from lightning_compress.quantization.primitives import QuantSpec, quantize_tensor

FLOOR_BITS = min(WIDTHS)  # the narrowest width a candidate has
FLOOR_SPARSITY = max(SPARSITIES)  # the largest sparsity a candidate has


def floor_bytes(weights: Mapping[str, Tensor], fixed: int) -> int:
    """Tensor bytes no plan can go below: every weight pruned or rounded to zero, stored sparse with no code
    (:mod:`~lightning_compress.quantization.sparse_layout`), so only one float32 scale per row stays (a per-group
    candidate has more scales), plus the entries no candidate changes. The header comes on top. Exact without any
    work (no codes are computed), so a budget below it is surely impossible; the cheapest plan's file is measured
    later (``Session.header``). A layer a fit does not prune counts the same: its codes may round to zero too."""
    return fixed + sum(w.shape[0] * 4 for w in weights.values())


def cheapest_bytes(weights: Mapping[str, Tensor], fixed: int, prunable: Collection[str] | None = None) -> int:
    """Tensor bytes of the cheapest plan on ``weights`` as they are now: every layer at the narrowest width and the
    largest sparsity (by magnitude; a layer outside ``prunable`` dense), per channel, min-max ranges (quick; the MSE
    search changes few codes of the largest tenth of a row). Not a floor: the plan made at the end of a fit is priced
    on the weights reached, whose kept entries may round to the empty code more or less often. What a budget far
    below it will most likely meet at the end of a fit (``AdaptiveCompression.setup`` warns)."""
    total = fixed
    for name, weight in weights.items():
        sparsity = FLOOR_SPARSITY if prunable is None or name in prunable else 0.0
        pruned = prune(weight, torch.ones_like(weight, dtype=torch.float32), sparsity)
        spec = QuantSpec(FLOOR_BITS, "per_channel", 128, True, "minmax")
        total += sparse_layout.nbytes(quantize_tensor(pruned, spec))
    return total


def floor_macs(weights: Mapping[str, Tensor], where: Mapping[str, float], other: int,
               prunable: Collection[str] | None = None) -> int:
    """MACs per example of the sparsest plan (the largest sparsity in every layer of ``prunable``, None: every
    layer; the others dense), plus those no candidate changes."""
    def kept(name: str, weight: Tensor) -> int:
        return weight.numel() - (math.floor(FLOOR_SPARSITY * weight.numel())
                                 if prunable is None or name in prunable else 0)
    return other + round(sum(kept(n, w) * where[n] for n, w in weights.items()))


@dataclass
class Problem:
    """``size_cap``: bytes for the whole file; ``macs_cap``: MACs per example for the whole model (None: no cap)."""

    candidates: dict[str, list[Candidate]]
    fixed_bytes: int
    other_macs: int
    size_cap: int | None
    macs_cap: int | None
    multipliers: dict[str, float] = field(default_factory=dict)  # per layer, the correction verification learned
    buckets: int = BUCKETS  # the knapsack's resolution of the cap (the fit's frequent sparsity plans use fewer)

    def score(self, candidate: Candidate) -> float:
        return candidate.score * self.multipliers.get(candidate.layer, 1.0)

    def choose(self, header: int) -> dict[str, Candidate] | None:
        """The best plan with ``header`` bytes reserved for the file's header, or None when nothing fits."""
        names = list(self.candidates)
        options = [self.candidates[n] for n in names]
        scores = [[self.score(c) for c in opts] for opts in options]
        sizes = [[float(c.nbytes) for c in opts] for opts in options]
        macs = [[float(c.macs) for c in opts] for opts in options]
        if self.size_cap is not None:
            room = self.size_cap - self.fixed_bytes - header
            if room <= 0:
                return None
            if self.macs_cap is None:
                picks = solve(scores, sizes, room, self.buckets)
            else:
                picks = solve_two(scores, sizes, room, macs, self.macs_cap - self.other_macs, self.buckets)
        else:
            if self.macs_cap is None or self.macs_cap - self.other_macs <= 0:
                return None
            picks = solve(scores, macs, self.macs_cap - self.other_macs, self.buckets)
        return None if picks is None else {n: opts[i] for n, opts, i in zip(names, options, picks)}

    def data_bytes(self, plan: Mapping[str, Candidate]) -> int:
        """The plan's tensor bytes: the chosen weights and every other entry (the header excluded)."""
        return self.fixed_bytes + sum(c.nbytes for c in plan.values())

    def macs(self, plan: Mapping[str, Candidate]) -> int:
        return self.other_macs + sum(c.macs for c in plan.values())

    def dense(self) -> Problem | None:
        """The same problem with only the unpruned candidates; None where no candidate is pruned (or a layer has no
        unpruned one). Its cheapest plan's file has fewer entries, so a smaller header, than the sparse one's."""
        kept = {n: [c for c in cs if c.sparsity == 0] for n, cs in self.candidates.items()}
        if kept == self.candidates or not all(kept.values()):
            return None
        return Problem(kept, self.fixed_bytes, self.other_macs, self.size_cap, self.macs_cap, dict(self.multipliers),
                       self.buckets)

    def scaled(self, factor: float) -> Problem:
        """The same problem with both caps multiplied by ``factor`` (searching for a budget that holds the bound)."""
        size = None if self.size_cap is None else math.floor(self.size_cap * factor)
        macs = None if self.macs_cap is None else math.floor(self.macs_cap * factor)
        return Problem(self.candidates, self.fixed_bytes, self.other_macs, size, macs, dict(self.multipliers),
                       self.buckets)


def rows(plan: Mapping[str, Candidate], problem: Problem, measured: Mapping[str, float]) -> list[dict[str, Any]]:
    """The plan as a table: per layer width, granularity, sparsity, predicted score, bytes, MACs and, where
    verification measured it, the metric drop with that layer alone compressed."""
    return [{"layer": n, "bits": c.bits, "granularity": c.granularity, "group_size": c.group_size,
             "sparsity": c.sparsity, "predicted": c.score, "corrected": problem.score(c), "bytes": c.nbytes,
             "macs": c.macs, "measured_drop": measured.get(n), "label": c.label()} for n, c in plan.items()]
