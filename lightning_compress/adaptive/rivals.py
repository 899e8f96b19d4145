"""The uniform configurations the solver's plan is measured against, and what plans are compared on when there is
no metric: "never trust" applied to the plan itself, not only to the bound (issue 23). No Lightning import.

Why: the score ``1/2 * sum(F * dW^2)`` is a second-order prediction. It ranks one layer's candidates well, but a
large change to a large layer (2 bits on SmallCNN's first Linear) costs far more than it predicts, relative to the
other candidates, so the knapsack can spend the budget on keeping small layers float and push the largest one to
2 bits, and measure worse than every layer at 3 bits (``benchmarks/bench_adaptive.py``, README "Compress to a
budget"). A per-layer scale measured at 4 bits does not catch it: the error is in how the prediction grows with
the change, not in its scale. So the plan is measured beside the few uniform configurations that fit the caps (the
lowest predicted first) and one measured better beyond the noise (below) is delivered instead. Where the dense
plan needs 2 bits somewhere, ``compress()`` also solves with sparsity and measures the dense plan beside that one
(``Session.also``): the score under-predicts heavy pruning too, so neither is trusted alone.

The measure is ``metric_fn`` when one is given. Without it (and without ``loss_fn``), :func:`against_float` picks
one: for a classifier's output (``(N, C)`` logits, ``C > 1``) the cross-entropy of the compressed model's outputs
against the float model's top-1 predictions on the calibration batches (:class:`TopOneLoss`); for any other output
(token states, embeddings, a regression, sequence logits) the output error relative to the float outputs
(:class:`OutputError`), since an argmax over their last dimension is not a class. On SmallCNN the top-1 loss ranked
the plan and the uniform configuration as validation accuracy did where the KL divergence to the float outputs did
not (the KL weighs the classes the model does not predict). A ``loss_fn`` may be a sampled loss whose value measures
nothing, so with a ``loss_fn`` and no ``metric_fn`` nothing is compared and the plan is delivered as solved.

Noise: near-equal plans measure apart by a sample or two, and picking the best of a few such measurements picks
noise (on SmallCNN a uniform configuration one validation sample ahead of the plan was delivered and tested worse).
So a rival replaces the plan only when it is better by more than the measure's own noise: :func:`clearly_lower`,
the paired per-sample differences (each calibration sample's value under the rival minus under the plan) below
zero by more than one standard error, with :mod:`lightning_compress.core.sequential`'s variance floor (the
one-standard-error rule of model selection: within it, the simpler choice, here the lower predicted loss). A
``metric_fn`` gives one number, whose noise one number cannot show: the metric must then say better too, and the
per-sample values of :func:`against_float` on the calibration batches say whether the difference is more than noise.

What that level costs, plainly: it is not a test with a controlled error. Each rival is tested one-sided at one
standard error against the one kept so far, with no correction for their number, so where the plan and its rivals
are equally good a rival still replaces the plan on noise, the more often the more rivals are measured (up to
four in ``compress()``); the rates, simulated through this rule's own code, are in
``benchmarks/results/rivals_noise.json`` (``benchmarks/bench_rivals_noise.py``). It is kept because the case the
comparison exists for (README, "Compress to a budget": SmallCNN seed 1, the plan's 2-bit Linear) wins by little
more than one standard error: a level adjusted for the number of rivals would keep the plan there, though the rival
was ahead on validation and on test too (the calibration batches alone cannot tell them apart at a usual level). A
replacement on noise swaps the plan for one measured as good on the calibration data (and, with a ``metric_fn``,
better on it too), never for one measured worse.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress.adaptive.candidates import Candidate
from lightning_compress.adaptive.fisher import first_tensor
from lightning_compress.adaptive.plan import Problem
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.core.sequential import PairedDifference

UNIFORM_TRIED = 3  # uniform configurations measured beside the plan (those that fit, the lowest predicted first)
HEADER_SLACK = 256  # bytes a uniform plan's header may come under the one reserved: its file is measured anyway
ONE_SE = 2 * NormalDist().cdf(1.0) - 1  # two-sided confidence of +-1 standard error: a rival must beat it (1-SE rule)

Key = tuple[float, int, str | None, int | None]  # sparsity, bits, granularity, group size


def _key(candidate: Candidate) -> Key:
    return candidate.sparsity, candidate.bits, candidate.granularity, candidate.group_size


def uniform_plans(problem: Problem, header: int) -> list[dict[str, Candidate]]:
    """Every uniform configuration among the candidates (each layer at the same sparsity, width and granularity;
    per channel where a layer's input has no such group, as ``bench_adaptive``'s grid does) whose bytes (with the
    reserved header, less :data:`HEADER_SLACK`) and MACs fit the caps, the lowest predicted score first."""
    keys = sorted({_key(c) for options in problem.candidates.values() for c in options},
                  key=lambda k: (k[0], k[1], k[2] or "", k[3] or 0))
    plans = []
    for key in keys:
        if key[1] == FLOAT_BITS:  # every layer float: the solver finds that plan itself where it fits
            continue
        plan = {}
        for name, options in problem.candidates.items():
            by_key = {_key(c): c for c in options}
            fallback = (key[0], key[1], "per_channel", None)
            chosen = by_key.get(key) or by_key.get(fallback)
            if chosen is None:
                break
            plan[name] = chosen
        else:
            fits = problem.size_cap is None or \
                problem.data_bytes(plan) + header - HEADER_SLACK <= problem.size_cap
            fits = fits and (problem.macs_cap is None or problem.macs(plan) <= problem.macs_cap)
            if fits and plan not in plans:
                plans.append(plan)
    return sorted(plans, key=lambda p: sum(problem.score(c) for c in p.values()))


class OutputError:
    """Squared error of a model's outputs to the float model's on the calibration batches, relative to the float
    outputs' energy: lower is better, 0 for the float model. What plans are compared on when the output is not a
    classifier's logits."""

    describes = "the output error relative to the float outputs on the calibration batches"

    def __init__(self, model: nn.Module, batches: Sequence[Any], run: Callable[[nn.Module, Any], Any],
                 reference: list[Tensor] | None = None) -> None:
        self.batches, self.run = batches, run
        self.reference = self._outputs(model) if reference is None else reference

    def _outputs(self, model: nn.Module) -> list[Tensor]:
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return [first_tensor(self.run(model, batch)).float() for batch in self.batches]
        finally:
            model.train(training)

    def samples(self, model: nn.Module) -> Tensor:
        """Each calibration sample's squared output error over the mean energy of a float output ``(N,)``: their
        mean is the measure."""
        errors = torch.cat([_rows(o - r).pow(2).sum(1) for o, r in zip(self._outputs(model), self.reference)])
        energy = sum(float(r.pow(2).sum()) for r in self.reference) / len(errors)
        return errors.double() / max(energy, torch.finfo(torch.float32).tiny)

    def __call__(self, model: nn.Module) -> float:
        return float(self.samples(model).mean())


class TopOneLoss(OutputError):
    """Cross-entropy of a model's outputs (the last dimension read as logits) against the float model's top-1
    predictions on the calibration batches, minus the float model's own, per sample and in the mean: lower is
    better, 0 for the float model."""

    describes = "the top-1 loss on the calibration batches"

    def __init__(self, model: nn.Module, batches: Sequence[Any], run: Callable[[nn.Module, Any], Any],
                 reference: list[Tensor] | None = None) -> None:
        super().__init__(model, batches, run, reference)
        self.labels = [x.reshape(-1, x.shape[-1]).argmax(-1) for x in self.reference]
        self.base = self._losses(self.reference)

    def _losses(self, outputs: Sequence[Tensor]) -> Tensor:
        logits = [x.reshape(-1, x.shape[-1]) for x in outputs]
        return torch.cat([F.cross_entropy(x, y, reduction="none") for x, y in zip(logits, self.labels)]).double()

    def samples(self, model: nn.Module) -> Tensor:
        return self._losses(self._outputs(model)) - self.base


def against_float(model: nn.Module, batches: Sequence[Any], run: Callable[[nn.Module, Any], Any]) -> OutputError:
    """:class:`TopOneLoss` where every calibration output is a classifier's ``(N, C)`` logits with ``C > 1``;
    :class:`OutputError` otherwise (an argmax over a last dimension that is not a class ranks nothing)."""
    measure = OutputError(model, batches, run)
    if measure.reference and all(o.dim() == 2 and o.shape[-1] > 1 for o in measure.reference):
        return TopOneLoss(model, batches, run, measure.reference)
    return measure


def clearly_lower(incumbent: Tensor, challenger: Tensor) -> bool:
    """Whether ``challenger``'s per-sample values (lower: better) are lower than ``incumbent``'s, on the same
    samples, by more than their noise: the mean paired difference below zero by more than one standard error
    (:data:`ONE_SE`), with :class:`~lightning_compress.core.sequential.PairedDifference`'s variance floor (as if one
    sample more had moved each way by the largest difference seen). No finite-population correction: the samples
    stand for the data the model will see, not for a set measured in full. A NaN / inf value counts as the worst:
    a finite ``challenger`` is lower than an ``incumbent`` holding one, a ``challenger`` holding one never is."""
    if not bool(torch.isfinite(challenger).all()) or not bool(torch.isfinite(incumbent).all()):
        return bool(torch.isfinite(challenger).all())
    differences = (challenger.double() - incumbent.double()).reshape(-1)
    if differences.numel() == 0:
        return False
    paired = PairedDifference(population=sys.maxsize, scale=float(differences.abs().max()))
    paired.add(float(differences.sum()), float(differences.square().sum()), differences.numel())
    return paired.interval(ONE_SE)[1] < 0


def _rows(output: Tensor) -> Tensor:
    """``(N, ...)`` as one row per sample (a 0-d output: one sample)."""
    return output.reshape(1, -1) if output.dim() == 0 else output.reshape(output.shape[0], -1)
