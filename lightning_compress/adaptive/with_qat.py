"""A budget's plan trained by quantization-aware training: ``AdaptiveCompression`` and ``QuantizationAwareTraining``
in one fit. No Lightning import.

``Trainer(callbacks=[AdaptiveCompression(budget=..., max_metric_drop=...), QuantizationAwareTraining(start=0.75)])``:
pruning during the first part of the fit, QAT in the last part. Two callbacks rather than a ``qat=`` flag because
each keeps the lifecycle it already has (pruning events, gate, rollback; fake quantizers, scales in the optimizer,
mid-QAT checkpoints, DDP re-wrapping), and the user writes what the Lightning docs teach: one callback per concern.
What the budget decides (widths, granularity, group size, the layers quantized, the bound, the export) is taken
from ``AdaptiveCompression``; a ``QuantizationAwareTraining`` argument that would decide it too is refused
(:func:`decided_twice`).

- **At QAT start** (pruning is over by then, checked before the first step): :func:`planned_only` runs the same
  ``compress(search="bits")`` planning the callback runs at the end of a fit without QAT, on the masks reached, and
  puts the model back (float weights, no codes). :func:`layer_plan` turns its rows into the per-layer specs QAT
  trains; a layer planned float stays float.
- **At the end** the codes QAT trained are what is checked and delivered: their file measured, their MACs counted,
  their metric judged (:func:`refusal`). Nothing is re-rounded. Codes that miss a cap or the bound are not
  delivered: the callback plans again from the latent float weights with the verified ``compress()`` (corrections,
  larger budgets tried), which never returns a model outside the bound, or ends the fit with ``BudgetError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.adaptive.candidates import Candidate
from lightning_compress.adaptive.compress import CompressionResult
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.core.gate import Verdict
from lightning_compress.quantization.carried import forget
from lightning_compress.quantization.coverage import QUANT_MODULE_TYPES, LayerPlan, layer_weight, select_layers

# QuantizationAwareTraining arguments the budget's plan decides in this composition (their defaults are accepted)
DECIDED_BY_BUDGET = ("bits", "granularity", "group_size", "bits_overrides", "embedding_bits", "module_types",
                     "include", "exclude", "max_metric_drop", "fallback", "export_path", "activations")
PLANNED_FLOAT = "kept float by the budget's plan"


@dataclass
class BudgetPlan:
    """The plan made when QAT started, as plain values (it travels in QAT's checkpoint state): the rows of
    :func:`~lightning_compress.adaptive.plan.rows`, the caps, the metric of the pruned float model it was verified
    against, and the verification steps taken."""

    rows: list[dict[str, Any]]
    budget_bytes: int | None
    budget_macs: int | None
    metric_before: float | None
    steps: list[str] = field(default_factory=list)
    evaluations: int = 0
    start_step: int = 0

    @classmethod
    def of(cls, result: CompressionResult, start_step: int) -> BudgetPlan:
        return cls([dict(row) for row in result.plan], result.budget_bytes, result.budget_macs, result.metric_before,
                   list(result.steps), result.evaluations, start_step)

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> BudgetPlan:
        return cls(**dict(state))


def decided_twice(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """``name=value`` for each argument of :data:`DECIDED_BY_BUDGET` given other than its default."""
    return [f"`{name}`={given[name]!r}" for name in DECIDED_BY_BUDGET
            if name in given and given[name] != defaults.get(name) and given[name] not in (None, {}, [])]


def refuse_decided_twice(given: Mapping[str, Any], init: Callable[..., Any]) -> None:
    """Raise naming each argument the budget decides that ``given`` sets other than ``init``'s default."""
    defaults = {name: p.default for name, p in inspect.signature(init).parameters.items()}
    if twice := decided_twice(given, defaults):
        raise ValueError(f"QuantizationAwareTraining with AdaptiveCompression trains the widths the budget plans; "
                         f"{', '.join(twice)} would decide them (or the bound / export) a second time; allowed: "
                         "leave them at their defaults (the budget, `max_metric_drop` and `export_path` are "
                         "AdaptiveCompression's)")


def planned_only(model: nn.Module, plan: Callable[[], CompressionResult]) -> CompressionResult:
    """``plan()`` (a ``compress()`` call, which writes its plan into ``model``), then ``model`` put back as it was:
    every quantizable weight as before, no codes carried. The plan, not the delivery."""
    layers, _ = select_layers(model, QUANT_MODULE_TYPES)
    weights = [layer_weight(name, module) for name, module in layers.items()]
    saved = [weight.detach().clone() for weight in weights]
    try:
        return plan()
    finally:
        with torch.no_grad():
            for weight, value in zip(weights, saved):
                weight.copy_(value)
        forget(model)


def layer_plan(model: nn.Module, rows: list[dict[str, Any]], calibration: str) -> LayerPlan:
    """The layers QAT fake-quantizes and each one's spec, from the plan's rows: the planned width, granularity and
    group size, symmetric (as the candidates were scored); a layer planned float is left out."""
    modules = dict(model.named_modules())
    layers, specs, skipped = {}, {}, {}
    for row in rows:
        name = row["layer"]
        spec = Candidate(name, row["bits"], row["granularity"], row["group_size"], row["sparsity"], 0, 0, 0.0) \
            .spec(calibration)
        if spec is None or row["bits"] == FLOAT_BITS:
            skipped[name] = PLANNED_FLOAT
            continue
        layers[name], specs[name] = modules[name], spec
    return LayerPlan(layers, specs, skipped)


def refusal(file_bytes: int | None, size_cap: int | None, macs: int | None, macs_cap: int | None,
            verdict: Verdict) -> str | None:
    """Why the trained codes cannot be delivered (a cap missed as measured, or the bound), or None."""
    if size_cap is not None and file_bytes is not None and file_bytes > size_cap:
        return f"their file measured {file_bytes} B > the cap {size_cap} B"
    if macs_cap is not None and macs is not None and macs > macs_cap:
        return f"{macs} MACs per example > the cap {macs_cap}"
    if not verdict.accepted:
        return verdict.reason
    return None
