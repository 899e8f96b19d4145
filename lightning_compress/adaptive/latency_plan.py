"""The plan under a latency budget (possibly with size / MACs caps): how many units each family keeps and which
layers run int8, chosen greedily by predicted loss per resource saved. No Lightning import.

A plan's resources are predicted from the dense model's:

- seconds: the latency table (:meth:`~.latency.LatencyTable.predict`, int8 rows for the int8 layers);
- bytes: the dense model's tensor bytes with each table layer's weight (and bias) replaced by its bytes in the plan:
  ``out * in * kernel`` entries at 4 bytes (float) or 1 byte plus a float32 scale per output channel (int8). What
  else shrinks with the units (BatchNorm rows) is not subtracted, nor the file's header added: the delivered file is
  measured and the target corrected (:func:`~.latency_budget.within`);
- MACs: the dense model's count with each table layer's ``out * in * kernel * positions`` replaced by the plan's.

:meth:`LatencyProblem.solve_joint` starts from the dense float model and repeatedly takes the move with the least
predicted loss per unit of progress, progress being the relative excess over the targets removed (a resource over
its target counts what the move saves of it over the target; a resource within its target counts against the move
only what the move puts it over). A move removes a family's next units (:mod:`.units`) or runs a larger set of
layers int8: one of the sets the table measured whole (:attr:`~.latency.LatencyTable.int8_models`; single int8
layers between float ones measured slower there, see :mod:`.latency`), at the summed score of the layers it adds
(:func:`~.int8_latency.int8_scores`). An int8 move that makes no progress is never taken, so int8 that the
measurements do not show faster is not chosen for latency (it can be for bytes). With latency alone and no int8
rows this is the NetAdapt-style greedy of :meth:`LatencyProblem.solve`, as before.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from lightning_compress.adaptive.latency import LatencyTable
from lightning_compress.adaptive.units import UnitCandidate
from lightning_compress.structure.dependency import UnitGroup

Targets = tuple[float | None, float | None, float | None]  # (seconds, bytes, MACs per example); None: no cap


@dataclass(frozen=True)
class LayerCost:
    """What one table layer costs per (output, input) pair: ``kernel`` weight entries, applied ``positions`` times
    per example; ``bias``: it has one."""

    kernel: int
    positions: float
    bias: bool

    def bytes(self, outputs: int, inputs: int, int8: bool) -> int:
        entries = outputs * inputs * self.kernel
        return (entries + 4 * outputs if int8 else 4 * entries) + (4 * outputs if self.bias else 0)

    def macs(self, outputs: int, inputs: int) -> float:
        return outputs * inputs * self.kernel * self.positions


@dataclass
class CapCosts:
    """The dense model's tensor bytes and MACs per example, and each table layer's :class:`LayerCost`."""

    layers: dict[str, LayerCost]
    dense_bytes: int
    dense_macs: int


@dataclass
class LatencyProblem:
    """The candidates of each family, and how a plan's unit counts turn into each layer's (outputs, inputs).
    ``int8_scores``: the layers that may run int8 (they have int8 rows) and what int8 is predicted to cost (the
    sets they run int8 in are the table's :attr:`~.latency.LatencyTable.int8_models`);
    ``units``: False when no units may go (int8 only); ``costs``: set when bytes / MACs are capped."""

    candidates: dict[str, list[UnitCandidate]]
    members: dict[str, list[str]]  # family -> its producers
    groups: Mapping[str, UnitGroup]
    scores: dict[str, Tensor]  # family -> per-unit predicted loss increase
    table: LatencyTable
    int8_scores: dict[str, float] = field(default_factory=dict)
    units: bool = True
    costs: CapCosts | None = None

    def sizes(self, plan: Mapping[str, UnitCandidate]) -> dict[str, tuple[int, int]]:
        sizes = {name: list(full) for name, full in self.table.full.items()}
        for name, candidate in plan.items():
            removed = candidate.units - candidate.kept
            for member in self.members[name]:
                if member in sizes:
                    sizes[member][0] = candidate.kept
            for consumer, repeat, _ in self.groups[name].consumers:
                if consumer in sizes:
                    sizes[consumer][1] -= removed * repeat
        return {name: (size[0], size[1]) for name, size in sizes.items()}

    def predict(self, plan: Mapping[str, UnitCandidate], int8: Collection[str] = ()) -> float:
        """Predicted seconds of the compacted model."""
        return self.table.predict(self.sizes(plan), int8=int8)

    def resources(self, plan: Mapping[str, UnitCandidate], int8: Collection[str] = ()) -> tuple[float, float, float]:
        """Predicted (seconds, bytes, MACs per example); bytes and MACs 0 without :attr:`costs`."""
        sizes = self.sizes(plan)
        seconds = self.table.predict(sizes, int8=int8)
        if self.costs is None:
            return seconds, 0.0, 0.0
        layers, full = self.costs.layers, self.table.full
        nbytes = self.costs.dense_bytes + sum(layers[n].bytes(*sizes[n], n in int8) - layers[n].bytes(*full[n], False)
                                              for n in layers)
        macs = self.costs.dense_macs + sum(layers[n].macs(*sizes[n]) - layers[n].macs(*full[n]) for n in layers)
        return seconds, float(nbytes), float(macs)

    def over(self, plan: Mapping[str, UnitCandidate], int8: Collection[str], targets: Targets) -> float:
        """How far ``plan`` with ``int8`` layers is predicted over ``targets``: the summed relative excess (0 when
        within every one)."""
        return _excess(self.resources(plan, int8), targets)

    def solve(self, target: float) -> dict[str, UnitCandidate]:
        """Units only, float: the first plan predicted within ``target`` seconds, else the sparsest."""
        return self.solve_joint((target, None, None), int8_allowed=False)[0]

    def solve_joint(self, targets: Targets, int8_allowed: bool = True
                    ) -> tuple[dict[str, UnitCandidate], frozenset[str]]:
        """The greedy plan (module docstring): units per family and the int8 layers, the first predicted within
        every target, else the last one progress reached. With int8: the greedy cannot take an int8 move back, and
        int8 taken early can be slower than float once the units are gone (small layers pay its quantize / layout
        overhead), so its plan is compared with the same units at every other int8 set and none, and with the
        float greedy; the one predicted least over the targets wins, then the least predicted loss."""
        plan, int8 = self._greedy(targets, int8_allowed)
        if not int8_allowed or not self.table.int8_models:
            return plan, int8
        options = [(plan, group) for group in {frozenset(), int8, *self.table.int8_models}]
        options.append(self._greedy(targets, False))
        return min(options, key=lambda o: (_excess(self.resources(*o), targets), self.loss(*o)))

    def loss(self, plan: Mapping[str, UnitCandidate], int8: Collection[str] = ()) -> float:
        """The predicted loss increase of ``plan`` with ``int8`` layers."""
        return sum(c.score for c in plan.values()) + sum(self.int8_scores[n] for n in int8)

    def _greedy(self, targets: Targets, int8_allowed: bool) -> tuple[dict[str, UnitCandidate], frozenset[str]]:
        at = dict.fromkeys(self.candidates, 0)
        plan = {name: options[0] for name, options in self.candidates.items()}
        int8: set[str] = set()
        current = self.resources(plan, int8)
        while _excess(current, targets) > 0:
            best: tuple[float, float, str, tuple[float, float, float]] | None = None  # (ratio, loss, move, after)
            for name, options in self.candidates.items() if self.units else ():
                if at[name] + 1 >= len(options):
                    continue
                after = self.resources({**plan, name: options[at[name] + 1]}, int8)
                cost = options[at[name] + 1].score - options[at[name]].score
                gain = _progress(current, after, targets)
                step = (cost / gain if gain > 0 else float("inf"), cost, name, after)
                if best is None or step[:2] < best[:2]:
                    best = step
            for group in self.table.int8_models if int8_allowed else ():
                if not group > int8:
                    continue
                after = self.resources(plan, group)
                gain = _progress(current, after, targets)
                cost = sum(self.int8_scores[n] for n in group - int8)
                step = (cost / gain if gain > 0 else float("inf"), cost, "int8:" + ",".join(sorted(group)), after)
                if gain > 0 and (best is None or step[:2] < best[:2]):  # no progress (a MACs cap int8 cannot lower)
                    best = step
            if best is None:
                break  # every family at its fewest units, no int8 move makes progress
            _, _, move, current = best
            if move.startswith("int8:"):
                int8 = set(move.removeprefix("int8:").split(","))
            else:
                at[move] += 1
                plan[move] = self.candidates[move][at[move]]
        return plan, frozenset(int8)


TINY = 1e-30  # a target of 0 (the sparsest plan asked for) still orders moves by what they save


def _excess(values: tuple[float, float, float], targets: Targets) -> float:
    return sum(max(0.0, value / max(target, TINY) - 1.0) for value, target in zip(values, targets)
               if target is not None)


def _progress(before: tuple[float, float, float], after: tuple[float, float, float], targets: Targets) -> float:
    """Relative excess a move removes: what it saves of each resource over its target, less what it puts over."""
    gain = 0.0
    for old, new, target in zip(before, after, targets):
        if target is None:
            continue
        gain += (old - new) / max(target, TINY) if old > target else -max(0.0, new / max(target, TINY) - 1.0)
    return gain
