"""The planner of a latency budget inside a fit (:class:`~.in_fit_units.LatencyRun` prunes toward its plan): per
family of units, the kept count planned for the budget. No Lightning import.

The first time it is asked (the first pruning event, when the structure analysis and the gradient statistics exist;
or, in a fit resumed after its last event, when the run needs its families: :meth:`LatencyPlanner.build`) it
measures the per-layer ONNX Runtime latency table, once per fit: on rank zero, shared with every rank (``share``:
the callback's broadcast) and kept in the run's checkpoint (:func:`table_state`), so a resumed fit re-uses it. Every
later plan, the re-plans after the recovery gate's verdicts included, is solved on that one table: timed anew at
each verdict, the plan moved with the machine's load. It keeps the dense model's graph too (a resumed model holds
zeros where units were pruned, not fewer units: its graph times as the dense one), which the delivered model is
timed against for real at the end of the fit (:func:`~.in_fit_units.verify`). At
every event each family's units are scored by the per-unit statistics the pruning run keeps:
``1/2 E[(sum_j w_ij g_ij)^2]`` per unit, summed over the family's producers (:func:`unit_fisher`), the Fisher's
predicted loss increase of removing the unit (its whole block, not the diagonal; units already removed score
lowest, so masks only shrink) and the greedy solve of :mod:`.latency_budget` plans each family's kept count for
:data:`~.latency_budget.AIM` of the budget; at the last event a plan measured within the budget
(:func:`~.latency_budget.within`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.adaptive.in_fit import from_rank_zero, rank_zero
from lightning_compress.adaptive.latency import LatencyTable, build_table, float_graph
from lightning_compress.adaptive.latency_budget import AIM, LatencyProblem, within
from lightning_compress.adaptive.units import LAYERS, family_candidates, kept_counts
from lightning_compress.pruning.structured import unit_families

__all__ = ["LatencyPlanner", "table_from_state", "table_state", "unit_fisher"]


class LatencyPlanner:
    """Per family (its first producer's name), the kept unit count planned for ``latency`` x the dense latency at
    ``shape`` with ``threads`` ORT threads. ``steps`` says what was measured. Under DDP only rank zero times
    graphs and solves (every rank takes its plan, broadcast); every rank scores the units, which the masks follow."""

    def __init__(self, model: nn.Module, latency: float, shape: tuple[int, ...], threads: int) -> None:
        self.model, self.latency, self.shape, self.threads = model, latency, shape, threads
        self.problem: LatencyProblem | None = None
        self.dense_graph: bytes | None = None
        self.steps: list[str] = []
        self.caps: Mapping[str, int] = {}  # family -> fewest units it may keep (events undone after recovery)
        self.table: LatencyTable | None = None  # measured once per fit (rank zero's, shared); a checkpoint's
        self.final_target: float | None = None  # seconds of the last event's plan as measured within the budget
        self.share: Callable[[Any], Any] = lambda value: value  # every rank takes rank zero's (the broadcast)
        self.example = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def _build(self, names: list[str], groups: Mapping[str, Any]) -> LatencyProblem:
        modules = dict(self.model.named_modules())
        members = {f[0]: f for f in unit_families(names, groups)
                   if all(groups[n].parts == 1 and groups[n].block == 1 and isinstance(modules[n], LAYERS)
                          for n in f)}
        outputs: dict[str, list[int]] = {}
        inputs: dict[str, list[int]] = {}
        for name, family in members.items():
            units = groups[name].num_units
            for member in family:
                outputs.setdefault(member, []).extend(kept_counts(units))
            for consumer, repeat, _ in groups[name].consumers:
                if isinstance(modules.get(consumer), LAYERS):
                    fan_in = int(modules[consumer].weight.shape[1])
                    inputs.setdefault(consumer, []).extend(fan_in - (units - k) * repeat for k in kept_counts(units))
        timed, kept = self.table is None, self.table

        def measured() -> LatencyTable:  # rank zero: the dense graph kept, the table timed (once per fit)
            self.dense_graph = float_graph(self.model, self.shape)
            return kept if kept is not None else build_table(self.model, self.shape, self.threads, outputs, inputs)

        # every rank takes rank zero's table (the others time nothing), or its error
        self.table = from_rank_zero(self.share, measured, "the latency table (ONNX export and timings)")
        if not rank_zero():  # only rank zero's plan is kept (broadcast)
            self.steps.append(f"{len(members)} families of units; the latency table is rank zero's")
            return LatencyProblem({}, members, groups, {}, self.table)  # never solved
        table = self.table
        assert table is not None
        said = "timed" if timed else "timed once in this fit (the checkpoint's table)"
        self.steps.append(f"{len(members)} families of units, {table.graphs} one-layer graphs {said}; dense "
                          f"{table.dense * 1e3:.3g} ms per run at {self.shape}, {self.threads} thread(s)")
        return LatencyProblem({}, members, groups, {}, table)

    def build(self, names: list[str], groups: Mapping[str, Any]) -> LatencyProblem:
        """The problem (families, latency table, the dense graph kept), built the first time it is asked."""
        if self.problem is None:
            self.problem = self._build(names, groups)
        return self.problem

    def score(self, fisher: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> None:
        """Each family's units scored from ``fisher`` (per layer, per unit: ``E[(sum w g)^2]``); units ``current``
        (unit keep-masks) removed score lowest."""
        problem = self.problem
        assert problem is not None
        for name, family in problem.members.items():
            scores = unit_fisher(family, fisher)
            fewest = self.caps.get(name, 0)
            problem.candidates[name] = [c for c in family_candidates(name, scores) if c.kept >= fewest] or \
                family_candidates(name, scores)[:1]
            keep = current.get(name)
            problem.scores[name] = scores if keep is None else torch.where(keep.cpu().bool(), scores, -1.0)

    def __call__(self, names: list[str], groups: Mapping[str, Any], fisher: Mapping[str, Tensor],
                 current: Mapping[str, Tensor], final: bool, caps: Mapping[str, int] | None = None) -> dict[str, int]:
        self.caps = dict(caps or {})
        problem = self.build(names, groups)
        self.score(fisher, current)  # every rank: the masks of an event follow the scores (LatencyRun.plan)
        # rank zero solves (and times, at the last event); every rank takes its plan, or its error
        return from_rank_zero(self.share, lambda: self._solve(problem, final), "the latency plan")

    def _solve(self, problem: LatencyProblem, final: bool) -> dict[str, int]:
        """Rank zero's plan: solved on the table; at the last event measured within the budget once."""
        if not final:
            plan = problem.solve(AIM * self.latency * problem.table.dense)
        elif self.final_target is not None:  # measured once already: the table's plan at those seconds
            plan = problem.solve(self.final_target)
            self.steps.append(f"re-planned on the table at the last event's {self.final_target * 1e3:.3g} ms (caps "
                              f"{dict(self.caps) or 'none'}; nothing timed)")
        else:
            # measured within AIM of the budget: the end-of-fit measurement, against the budget itself, times again
            delivered, smallest = within(self.model, problem, AIM * self.latency, self.example, self.shape,
                                         self.threads, self.steps, (), lambda m, b: m(b))  # no BatchNorm refresh
            if delivered is None:  # the sparsest plan: the end-of-fit measurement refuses it with its figure
                self.steps.append(f"no plan measured within {self.latency:g} (smallest {smallest}); the sparsest")
                plan = problem.solve(0.0)
            else:
                plan = delivered.plan
            self.final_target = problem.predict(plan)
        return {name: candidate.kept for name, candidate in plan.items()}


def unit_fisher(family: list[str], second_moment: Mapping[str, Tensor]) -> Tensor:
    """``1/2 * sum over the family's producers of E[(sum_j w_ij g_ij)^2]`` per unit (float64, CPU)."""
    return 0.5 * torch.stack([second_moment[m].detach().double().cpu() for m in family]).sum(0)


def table_state(table: LatencyTable | None) -> dict[str, Any] | None:
    """``table`` as plain values for a checkpoint (tuples and sets as lists)."""
    if table is None:
        return None

    def rows(times: Mapping[str, Mapping[tuple[int, int], float]]) -> dict[str, list[list[float]]]:
        return {n: [[o, i, s] for (o, i), s in r.items()] for n, r in times.items()}

    return {"full": {n: list(f) for n, f in table.full.items()}, "times": rows(table.times), "dense": table.dense,
            "graphs": table.graphs, "int8": rows(table.int8),
            "int8_models": [[sorted(group), s] for group, s in table.int8_models.items()]}


def table_from_state(state: Mapping[str, Any] | None) -> LatencyTable | None:
    """The table :func:`table_state` wrote (None: none was)."""
    if state is None:
        return None

    def rows(times: Mapping[str, list[list[float]]]) -> dict[str, dict[tuple[int, int], float]]:
        return {str(n): {(int(o), int(i)): float(s) for o, i, s in r} for n, r in times.items()}

    return LatencyTable(full={str(n): (int(f[0]), int(f[1])) for n, f in state["full"].items()},
                        times=rows(state["times"]), dense=float(state["dense"]), graphs=int(state["graphs"]),
                        int8=rows(state.get("int8", {})),
                        int8_models={frozenset(g): float(s) for g, s in state.get("int8_models", [])})
