"""``AdaptiveCompression``'s side of a fit with ``QuantizationAwareTraining``: which peers it accepts, the plan it
makes when QAT starts, and the check of the codes QAT trained before they are delivered. The pure pieces live in
:mod:`lightning_compress.adaptive.with_qat` (why two callbacks, what is refused, what happens to codes that miss a
cap or the bound); this touches the Trainer (ranks, validation, batches).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_compress.adaptive.caps import budget_caps
from lightning_compress.adaptive.compress import CompressionResult
from lightning_compress.adaptive.costs import delivered_macs, file_bytes
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.adaptive.with_qat import BudgetPlan, planned_only, refusal
from lightning_compress.callbacks.adaptive_plan import back_to_floats
from lightning_compress.callbacks.base import compression_callbacks
from lightning_compress.callbacks.qat import QuantizationAwareTraining
from lightning_compress.callbacks.quantization import _calibration_forward
from lightning_compress.integration import evaluation
from lightning_compress.qat.model import carry
from lightning_compress.quantization import sparse_layout
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.coverage import QUANT_MODULE_TYPES, layer_weight, select_layers

if TYPE_CHECKING:
    from lightning_compress.callbacks.adaptive import AdaptiveCompression


def qat_peer(callback: AdaptiveCompression, trainer: pl.Trainer) -> QuantizationAwareTraining | None:
    """The one ``QuantizationAwareTraining`` beside ``callback``, if any; any other compression callback, or QAT with
    a latency budget (its model is delivered float: no widths to train), is refused."""
    peers = [c for c in compression_callbacks(trainer) if c is not callback]
    qat = [c for c in peers if type(c) is QuantizationAwareTraining]
    others = [type(c).__name__ for c in peers if len(qat) != 1 or c is not qat[0]]
    if others:
        raise ValueError(f"AdaptiveCompression plans pruning and quantization together; {others} in the same "
                         "Trainer would compress the model a second time; allowed: AdaptiveCompression alone, "
                         "or with one QuantizationAwareTraining (which then trains the budget's widths)")
    if qat and callback.budget.latency is not None:
        raise ValueError(f"`budget` latency={callback.budget.latency!r} delivers a compacted float model (int8 "
                         "latency is not planned), so QuantizationAwareTraining would have no widths to train; "
                         "allowed: a size / MACs budget with QuantizationAwareTraining, or the latency budget "
                         "without it")
    return qat[0] if qat else None


def plan_widths(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule) -> BudgetPlan:
    """The widths and granularity the end of the fit would plan (``compress(search="bits")`` on the masks reached,
    round to nearest, verified on the bound), not delivered: the model is left float, the fit's random stream
    untouched. Rank zero's plan, on every rank. A budget and a bound that cannot both hold end the fit here."""
    try:
        with torch.random.fork_rng(devices=[]):
            result = planned_only(pl_module, lambda: callback._compress(trainer, pl_module, "rtn", mid_fit=True))
    except BudgetError as err:
        callback._fail(trainer, pl_module, err)
    return trainer.strategy.broadcast(BudgetPlan.of(result, trainer.global_step), src=0)


def deliver_trained(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    codes: dict[str, Any], floats: dict[str, torch.Tensor],
                    ) -> tuple[CompressionResult | None, str | None]:
    """The codes QAT trained (``codes``, empty when it never started), carried by the model as they are, then
    measured: the file, the MACs of the weights and the bound against the metric before pruning (the planning's float
    metric when nothing was pruned). None and why (the model back to its latent float weights ``floats``) when they
    miss a cap or the bound; (None, None) without codes."""
    plan = callback._qat.budget_plan if callback._qat is not None else None
    if not codes or plan is None:
        return None, None
    carry(pl_module, codes, "QuantizationAwareTraining")
    try:
        return _check_trained(callback, trainer, pl_module, codes, floats, plan)
    except BaseException:  # the latent weights are the only float copy left (QAT's parametrizations are gone)
        back_to_floats(pl_module, floats)
        raise


def _check_trained(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule,
                   codes: dict[str, Any], floats: dict[str, torch.Tensor], plan: BudgetPlan,
                   ) -> tuple[CompressionResult | None, str | None]:
    """:func:`deliver_trained` once the model carries the trained codes."""
    layers, _ = select_layers(pl_module, QUANT_MODULE_TYPES)
    weights = {name: layer_weight(name, module) for name, module in layers.items()}
    batches = callback._batches(trainer, pl_module)
    caps = budget_caps(pl_module, callback.budget, batches[0] if batches else None,
                       _calibration_forward if batches else None)
    size = file_bytes(pl_module) if carried(pl_module) is not None else None
    macs = delivered_macs(weights, caps.where, caps.other_macs) if batches else None
    after = evaluation.evaluate(trainer, pl_module, callback.metric_spec) if callback._has_val else None
    initial = callback.controller.initial_metric
    reference = initial if initial is not None else plan.metric_before
    verdict = callback.gate.judge(reference, after)
    why = refusal(size, plan.budget_bytes, macs, plan.budget_macs, verdict)
    shown = f"file {size} B, {macs} MACs" + ("" if after is None else f", metric {after:.6g}")
    if why is not None:
        rank_zero_info(f"AdaptiveCompression: the codes QAT trained are not delivered ({why}); planning again from "
                       "the latent float weights")
        back_to_floats(pl_module, floats)
        return None, f"QAT's codes ({shown}) not delivered: {why}; planned again from the latent weights"
    rows = [dict(row) for row in plan.rows]
    for row in rows:  # the bytes of the codes delivered (a sparse layout's may move with the codes)
        if row["layer"] in codes:
            row["bytes"] = sparse_layout.nbytes(codes[row["layer"]])
    drop = None if verdict.drop is None else round(verdict.drop, 6)
    steps = [*plan.steps, f"QAT trained the plan from step {plan.start_step}: {shown} (drop {drop} against "
             f"{reference}): delivered as trained"]
    return CompressionResult(pl_module, rows, plan.budget_bytes, size, plan.budget_macs, macs, plan.metric_before,
                             after, plan.evaluations + int(after is not None), steps, method="qat"), None
