"""Apply a plan to the model, measure what it delivered, correct and re-solve: the verification loop of
:func:`~lightning_compress.adaptive.compress.compress`. No Lightning import.

Nothing predicted is trusted: the file is measured (:func:`.costs.write_file` into a temporary directory), the MACs are
counted on the weights as they are, and the metric decides. When the metric bound fails, each compressed layer is
measured alone (the others float); each layer's scores are multiplied by its share of the measured drops over its
share of the predicted ones, and the plan is solved again (SPDY-like: measurements replace the predicted scale).
When that no longer changes the plan, or the corrections are used up, larger budgets are tried until one holds the
bound, then bisected down towards the asked one: the smallest found to hold goes into the error, and the model gets
its float weights back.

With ``rivals`` (``search="joint"``), the plan is also measured beside the few uniform configurations that fit
the caps (:mod:`.rivals`), and one replaces it only when measured better by more than the measure's noise
(:func:`.rivals.clearly_lower`; within the noise the lower predicted loss stays): the prediction chooses the plan,
the measurement overrides it only where it shows a real difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.adaptive.candidates import Candidate, realise
from lightning_compress.adaptive.costs import delivered_macs, file_bytes
from lightning_compress.adaptive.plan import Problem
from lightning_compress.adaptive.rivals import OutputError, clearly_lower, uniform_plans
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.core.gate import MetricGate
from lightning_compress.quantization.carried import attach, drop
from lightning_compress.quantization.layer import record_layer

HEADER_ROUNDS = 4  # re-solves with the header measured before giving up on a size cap
HEADER_MARGIN = 64  # bytes added per header re-solve: the next plan's header may differ by a few digits
MIN_FACTOR = 0.5  # a correction never scales a layer's scores below half: one quiet measurement is not proof
BUDGET_STEPS = (1.25, 1.5, 2.0, 3.0, 4.0, 8.0)  # budget factors tried to find one that holds the bound
REFINE_STEPS = 4  # bisections between the first step that holds and the one below it (1.25x: to within 1.6 %)


class BudgetError(ValueError):
    """The budget and the metric bound cannot both hold. ``smallest`` is the (bytes, MACs per example) of the
    smallest budget tried whose plan met the bound, as measured (None where that resource had no cap)."""

    def __init__(self, message: str, smallest: tuple[int | None, int | None] | None) -> None:
        super().__init__(message)
        self.smallest = smallest


@dataclass
class Delivered:
    plan: dict[str, Candidate]
    file_bytes: int | None
    macs: int | None
    metric: float | None = None


@dataclass
class Rival:
    """A plan measured beside the solver's: how much worse than the float model it measured, and what it is;
    ``predicted``: its predicted loss; ``samples``: the proxy's per-sample values (None: no proxy)."""

    loss: float
    delivered: Delivered
    what: str
    predicted: float = 0.0
    samples: Tensor | None = None


@dataclass
class Session:
    model: nn.Module
    layers: dict[str, nn.Module]
    weights: dict[str, Tensor]  # the live parameters
    keys: dict[str, str]  # layer -> state_dict key
    floats: dict[str, Tensor]  # the float weights: the way back
    fisher: dict[str, Tensor]
    where: dict[str, float]
    calibration: str
    metric_fn: Callable[[nn.Module], float] | None
    measure: Callable[[Callable[[nn.Module], Any], nn.Module], float]
    gate: MetricGate
    before: float | None
    steps: list[str] = field(default_factory=list)
    evaluations: int = 0
    measured: dict[str, float] = field(default_factory=dict)
    cheapest_file: int | None = None  # bytes of the cheapest plan's file, header included (measured)
    tried: list[dict[str, Any]] = field(default_factory=list)  # each plan measured, for the report's frontier
    rivals: int = 0  # uniform configurations measured beside each first plan (0: the plan is delivered as solved)
    proxy: OutputError | None = None  # per-sample values against the float model: the measure without a metric,
    # the noise of the metric's differences with one (lower: better; .rivals.against_float)
    also: list[dict[str, Candidate]] = field(default_factory=list)  # other plans measured beside it (with rivals)

    # ---------------------------------------------------------------- applying
    def restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.weights.items():
                weight.copy_(self.floats[name])
        drop(self.model, self.keys.values())

    def write(self, plan: dict[str, Candidate]) -> None:
        """The float weights everywhere, then each layer as its candidate says; the model carries the codes."""
        self.restore()
        codes = {}
        for name, candidate in plan.items():
            approx, qtensor = realise(self.floats[name], self.fisher[name], candidate, self.calibration)
            if qtensor is None:
                with torch.no_grad():
                    self.weights[name].copy_(approx)
            else:
                layer = record_layer(name, self.layers[name], qtensor, "rtn", self.floats[name])
                codes[self.keys[name]] = layer.qtensor
        if codes:
            attach(self.model, codes, "compress()")

    def metric(self) -> float | None:
        if self.metric_fn is None:
            return None
        self.evaluations += 1
        return self.measure(self.metric_fn, self.model)

    # ---------------------------------------------------------------- delivering within the caps
    def deliver(self, problem: Problem, header: int) -> Delivered | None:
        """Solve, write and measure. A file over its cap is solved again with its header as measured; a file under
        it too (a smaller header leaves room for a better plan). The model holds the plan returned."""
        best: Delivered | None = None
        held: dict[str, Candidate] | None = None  # the plan the model holds (the last one written)
        for _ in range(HEADER_ROUNDS):
            plan = problem.choose(header)
            if plan is None or (best is not None and plan == best.plan):
                break
            self.write(plan)
            held = plan
            if all(c.bits == FLOAT_BITS for c in plan.values()):
                self.steps.append("the plan keeps every layer float: no codes to save_quantized; save_float writes "
                                  "it (CompressionResult.save chooses)")
            size = file_bytes(self.model) if problem.size_cap is not None else None  # the float file too
            macs = delivered_macs(self.weights, self.where, problem.other_macs)
            if problem.macs_cap is not None and macs > problem.macs_cap:
                break  # cannot happen (quantization only adds zeros); never deliver over the cap
            if size is None or problem.size_cap is None:
                return Delivered(plan, size, macs)
            measured = size - problem.data_bytes(plan) + HEADER_MARGIN
            if size <= problem.size_cap:
                best = Delivered(plan, size, macs)
                if measured >= header:
                    break
            else:
                self.steps.append(f"file {size} B > cap {problem.size_cap} B: solved again with the header as "
                                  f"measured ({measured} B reserved)")
            header = measured
        if best is not None and best.plan != held:
            self.write(best.plan)  # a later plan was over the cap: the best one back (not the last one chosen)
        return best

    def header(self, problem: Problem) -> int:
        """The header of the file of the cheapest plan (every layer quantized, the most entries), measured; a plan
        whose header turns out larger is solved again (:meth:`deliver`). :attr:`cheapest_file` keeps the smallest
        such file over every problem measured: with sparsity offered the cheapest plan by tensor bytes has a
        larger header, and its file can be larger than the dense cheapest plan's."""
        cheapest = {n: min(cs, key=lambda c: (c.nbytes, c.score)) for n, cs in problem.candidates.items()}
        self.write(cheapest)
        size = file_bytes(self.model)
        self.cheapest_file = size if self.cheapest_file is None else min(self.cheapest_file, size)
        self.restore()
        return size - problem.data_bytes(cheapest)

    def verified(self, problem: Problem, header: int, corrections: int) -> Delivered | None:
        """The first delivered plan that meets the bound, correcting up to ``corrections`` times; None if none. With
        :attr:`rivals`, the one :meth:`_best` keeps of the plan and the uniform configurations that fit is judged."""
        last: dict[str, Candidate] | None = None
        rivals: list[Rival] | None = None
        for round_ in range(corrections + 1):
            delivered = self.deliver(problem, header)
            if delivered is None:
                self.steps.append("no plan fits the caps")
                return None
            if last is not None and delivered.plan == last:
                self.steps.append("the corrected scores chose the same plan: no further correction")
                return None
            delivered.metric = self.metric()
            self.record(delivered, f"plan ({round_} corrections)" if round_ else "plan")
            own = self._judged(problem, delivered, "the plan")
            if rivals is None:  # measured once: the uniform configurations do not change with the corrections
                rivals = self._rivals(problem, header, delivered.plan)
            chosen, finite = self._best(delivered, own, rivals)
            verdict = self.gate.judge(self.before, chosen.metric)
            self.steps.append(self._describe(chosen, verdict.drop))
            if not finite:  # NaN / inf outputs (an overflowing narrow layer): refused like a failed bound
                self.steps.append("its measure is not finite (NaN / inf per-sample values): not delivered")
            elif verdict.accepted:
                return chosen
            if round_ < corrections:
                self.correct(problem, delivered.plan)
            last = delivered.plan
        return None

    # ---------------------------------------------------------------- comparing with uniform configurations
    def _judged(self, problem: Problem, delivered: Delivered, what: str) -> Rival | None:
        """How much worse than the float model the plan the model holds measures (lower: better) and the proxy's
        per-sample values; None: no measure (or no rivals to compare with)."""
        if not self.rivals:
            return None
        samples = None if self.proxy is None else self.proxy.samples(self.model)
        loss = self.gate.drop(self.before, delivered.metric) if self.metric_fn is not None else \
            None if samples is None else float(samples.mean())
        predicted = sum(problem.score(c) for c in delivered.plan.values())
        return None if loss is None else Rival(loss, delivered, what, predicted, samples)

    def _rivals(self, problem: Problem, header: int, plan: dict[str, Candidate]) -> list[Rival]:
        """The plans of :attr:`also`, then up to :attr:`rivals` uniform configurations, whose measured file and MACs
        fit the caps, each measured."""
        if not self.rivals or (self.metric_fn is None and self.proxy is None):
            return []
        out = [r for other in self.also if other != plan and (r := self._measured(problem, other, "the dense plan"))]
        uniform_left = self.rivals
        for uniform in uniform_plans(problem, header):
            if uniform_left == 0:
                break
            if uniform != plan and uniform not in self.also:
                rival = self._measured(problem, uniform, f"uniform {_label(uniform)}")
                if rival is not None:
                    out.append(rival)
                    uniform_left -= 1
        return out

    def _measured(self, problem: Problem, plan: dict[str, Candidate], what: str) -> Rival | None:
        """``plan`` written and measured: None where its file or MACs are over the caps (or there is no measure)."""
        self.write(plan)
        size = file_bytes(self.model) if problem.size_cap is not None else None
        macs = delivered_macs(self.weights, self.where, problem.other_macs)
        over = size is not None and problem.size_cap is not None and size > problem.size_cap
        if over or (problem.macs_cap is not None and macs > problem.macs_cap):
            return None
        rival = Delivered(plan, size, macs)
        rival.metric = self.metric()
        self.record(rival, what)
        return self._judged(problem, rival, what)

    def _best(self, delivered: Delivered, own: Rival | None, rivals: list[Rival]) -> tuple[Delivered, bool]:
        """The plan, or a rival measured better by more than the noise (:func:`choose`); the model holds the one
        returned; and whether its measure is finite (nothing measured: True)."""
        if own is None:
            return delivered, True
        best = choose(own, rivals)
        if rivals:
            what = "the metric's drop" if self.metric_fn is not None else getattr(self.proxy, "describes", "?")
            shown = "; ".join(f"{r.what} {r.loss:.4g}" for r in rivals)
            rule = "" if own.samples is None or self.proxy is None else \
                f" (a rival replaces the plan only where it measures lower and {self.proxy.describes}, per " \
                "sample, is lower by more than one standard error)"
            self.steps.append(f"compared on {what}: the plan {own.loss:.4g}; {shown}; delivered: {best.what}{rule}")
        self.write(best.delivered.plan)  # also where every rival was over the caps: each was written to measure it
        return best.delivered, _finite(best)

    def _describe(self, delivered: Delivered, drop_: float | None) -> str:
        parts = [f"plan: {sum(c.bits != FLOAT_BITS for c in delivered.plan.values())} layers quantized"]
        if delivered.file_bytes is not None:
            parts.append(f"file {delivered.file_bytes} B")
        parts.append(f"{delivered.macs} MACs")
        if drop_ is not None:
            parts.append(f"metric {delivered.metric:.6g} (drop {drop_:.4g})")
        return ", ".join(parts)

    def record(self, delivered: Delivered, what: str) -> None:
        """One plan measured (bytes, MACs, metric, within the bound): a point of the report's frontier."""
        self.tried.append({"bytes": delivered.file_bytes, "macs": delivered.macs, "metric": delivered.metric,
                           "what": what, "accepted": self.gate.judge(self.before, delivered.metric).accepted})

    # ---------------------------------------------------------------- correcting
    def correct(self, problem: Problem, plan: dict[str, Candidate]) -> None:
        """Measure each compressed layer alone; multiply its scores by its share of the measured drop over its share
        of the predicted one (at least :data:`MIN_FACTOR`), so the next solve moves bytes to the under-rated layers."""
        predicted, measured = {}, {}
        for name, candidate in plan.items():
            if candidate.bits == FLOAT_BITS and candidate.sparsity == 0:
                continue
            self.write({name: candidate})
            drop_ = self.gate.drop(self.before, self.metric())
            self.measured[name] = 0.0 if drop_ is None else drop_
            measured[name], predicted[name] = max(self.measured[name], 0.0), problem.score(candidate)
        total_measured, total_predicted = sum(measured.values()), sum(predicted.values())
        if total_measured <= 0 or total_predicted <= 0:
            self.steps.append(f"measured {len(measured)} layers alone: none drops the metric alone (the drop comes "
                              "from their interaction); nothing to correct")
            return
        factors = {}
        for name in measured:
            share = (measured[name] / total_measured) / max(predicted[name] / total_predicted, 1e-12)
            factors[name] = max(share, MIN_FACTOR)
            problem.multipliers[name] = problem.multipliers.get(name, 1.0) * factors[name]
        shown = ", ".join(f"{n}: x{f:.3g}" for n, f in factors.items())
        self.steps.append(f"measured {len(measured)} layers alone; scores scaled by their share of the measured drop "
                          f"over their share of the predicted one ({shown})")

    def smallest_passing(self, problem: Problem, header: int) -> Problem | None:
        """The smallest larger budget found whose plan, solved with the corrections learned so far, meets the bound,
        as measured: the first of :data:`BUDGET_STEPS` that does, then :data:`REFINE_STEPS` bisections between it
        and the factor below it (a step alone can name a budget far above one that holds). Only budgets whose plan
        was measured to meet it are returned."""
        below = 1.0
        for above in BUDGET_STEPS:
            if self.verified(problem.scaled(above), header, corrections=0) is not None:
                break
            below = above
        else:
            return None
        for _ in range(REFINE_STEPS):
            middle = (below + above) / 2
            if self.verified(problem.scaled(middle), header, corrections=0) is not None:
                above = middle
            else:
                below = middle
        self.steps.append(f"the smallest larger budget found to hold: {above:.4g}x the asked one (between "
                          f"{below:.4g}x, which did not)")
        return problem.scaled(above)


def choose(own: Rival, rivals: Sequence[Rival]) -> Rival:
    """The plan (``own``), or a rival that :func:`_beats` it: the rivals taken in the order of their predicted loss,
    each against the one kept so far (within the noise the lower predicted stays)."""
    best = own
    for rival in sorted(rivals, key=lambda r: r.predicted):
        if _beats(rival, best):
            best = rival
    return best


def _finite(rival: Rival) -> bool:
    return math.isfinite(rival.loss) and (rival.samples is None or bool(torch.isfinite(rival.samples).all()))


def _beats(rival: Rival, kept: Rival) -> bool:
    """Whether ``rival`` measured better than ``kept``: lower on the measure and, where both have the proxy's
    per-sample values, lower on them by more than their noise (:func:`.rivals.clearly_lower`); without them (no
    proxy), lower as measured. A measure holding NaN / inf counts as the worst: a finite rival beats such a ``kept``,
    such a rival never wins."""
    if not _finite(rival) or not _finite(kept):
        return _finite(rival)
    if rival.loss >= kept.loss:
        return False
    return rival.samples is None or kept.samples is None or clearly_lower(kept.samples, rival.samples)


def _label(plan: dict[str, Candidate]) -> str:
    """A uniform plan's configuration (per channel where a layer's input has no such group)."""
    return " / ".join(sorted({c.label() for c in plan.values()}))
