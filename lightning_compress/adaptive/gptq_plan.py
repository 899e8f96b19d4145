"""GPTQ for a delivered plan: ``compress(method="gptq")``. No Lightning import.

The plan is made and verified with round to nearest (the candidates' scores and bytes are RTN's); then each
quantized layer GPTQ supports is quantized again with GPTQ (:func:`~lightning_compress.quantization.gptq.gptq_model`,
sequentially, on the calibration batches) at the width and granularity the plan chose for it. The codes have the
same shape and the scales the same count, so a dense layout has the same bytes; a sparse layout may differ (GPTQ
can round other weights to zero, or fewer), so the file is measured again. GPTQ is kept only when, as measured, its
file is within the size cap and it is no worse than round to nearest on ``metric_fn`` (without one: on the KL
divergence of the outputs to the float model's on the calibration batches); otherwise the RTN plan is written
back. Pruned weights stay exactly zero (GPTQ keeps exact zeros), so the MACs are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.adaptive.candidates import prune, realise
from lightning_compress.adaptive.costs import delivered_macs, file_bytes
from lightning_compress.adaptive.fisher import first_tensor
from lightning_compress.adaptive.plan import Problem
from lightning_compress.adaptive.session import Delivered, Session
from lightning_compress.quantization.carried import attach, drop
from lightning_compress.quantization.gptq import GPTQConfig, gptq_model
from lightning_compress.quantization.hessian import gptq_supports
from lightning_compress.quantization.layer import record_layer

METHODS = ("rtn", "gptq")  # compress(method=...): how the plan's widths are applied


def _logits(model: nn.Module, batches: Sequence[Any], run: Callable[[nn.Module, Any], Any]) -> list[Tensor]:
    with torch.no_grad():
        outputs = [first_tensor(run(model, batch)).float() for batch in batches]
    return [o.reshape(-1, o.shape[-1]) for o in outputs]


def _kl(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    """Mean KL divergence of ``outputs`` to ``reference`` (the float model's), per batch."""
    return sum(float(F.kl_div(torch.log_softmax(o, -1), torch.log_softmax(r, -1), log_target=True,
                              reduction="batchmean")) for r, o in zip(reference, outputs)) / max(len(outputs), 1)


def apply_gptq(session: Session, problem: Problem, delivered: Delivered, batches: Sequence[Any],
               run: Callable[[nn.Module, Any], Any], config: GPTQConfig | None = None,
               one_rank: Callable[[Callable[[], Any]], Any] | None = None) -> tuple[Delivered, str]:
    """The delivered plan with GPTQ where that is measured no worse (see the module docstring), and the method the
    model now holds (``"gptq"`` or ``"rtn"``). The model holds the plan returned; one step is noted. ``one_rank``
    (DDP): runs GPTQ on rank zero alone and gives every rank its codes, which each rank then writes as its weights."""
    plan = delivered.plan
    todo = {n: session.layers[n] for n, c in plan.items()
            if c.spec(session.calibration) is not None and not gptq_supports(session.layers[n])}
    if not todo:
        session.steps.append("gptq: no quantized layer GPTQ supports; round to nearest kept")
        return delivered, "rtn"
    training = session.model.training
    session.model.eval()
    try:
        reference = None
        if session.metric_fn is None:  # the float model's outputs, the measure without a metric
            session.restore()
            reference = _logits(session.model, batches, run)
            session.write(plan)
        rtn = delivered.metric if reference is None else _kl(reference, _logits(session.model, batches, run))
        with torch.no_grad():  # the pruned float weights back where GPTQ runs; RTN stays elsewhere
            for name in todo:
                session.weights[name].copy_(prune(session.floats[name], session.fisher[name], plan[name].sparsity))
        specs = {n: plan[n].spec(session.calibration) for n in todo}
        def quantized() -> tuple[dict[str, Any], dict[str, str]]:
            return gptq_model(session.model, todo, specs, batches, run, config or GPTQConfig())  # type: ignore[arg-type]

        qtensors, left = quantized() if one_rank is None else one_rank(quantized)
        if one_rank is not None:  # rank zero's codes, written as gptq_model writes them (the same on rank zero)
            with torch.no_grad():
                for name, qtensor in qtensors.items():
                    session.weights[name].copy_(qtensor.dequantize())
        if left:  # not reached by the calibration forward: their RTN codes are still attached, weights back
            session.steps.append(f"gptq: {sorted(left)} left to round to nearest ({'; '.join(set(left.values()))})")
            with torch.no_grad():
                for name in left:
                    session.weights[name].copy_(realise(session.floats[name], session.fisher[name], plan[name],
                                                        session.calibration)[0])
        codes = {session.keys[n]: record_layer(n, session.layers[n], q, "gptq", session.floats[n]).qtensor
                 for n, q in qtensors.items()}
        drop(session.model, codes)  # RTN's record of these keys goes (its source with it, where none is left)
        attach(session.model, codes, "compress() gptq")
        size = file_bytes(session.model) if problem.size_cap is not None else None
        macs = delivered_macs(session.weights, session.where, problem.other_macs)
        gptq = session.metric() if reference is None else _kl(reference, _logits(session.model, batches, run))
    finally:
        session.model.train(training)
    measure = "the metric" if reference is None else "KL to the float outputs on the calibration batches"
    worse = session.gate.drop(rtn, gptq) if reference is None else gptq - rtn  # type: ignore[operator]
    over = size is not None and problem.size_cap is not None and size > problem.size_cap
    over = over or (problem.macs_cap is not None and macs > problem.macs_cap)
    if over or (worse is not None and worse > 0):
        why = f"its file {size} B is over the cap {problem.size_cap} B" if over else \
            f"it is worse on {measure} ({gptq:.6g} vs {rtn:.6g})"
        session.steps.append(f"gptq on {len(codes)} layers: {why}; round to nearest kept")
        session.write(plan)
        return delivered, "rtn"
    session.steps.append(f"gptq on {len(codes)} layers: {measure} {gptq:.6g} (round to nearest: {rtn:.6g}); kept"
                         + (f", file {size} B" if size is not None else ""))
    return Delivered(plan, size if size is not None else delivered.file_bytes, macs,
                     gptq if reference is None else delivered.metric), "gptq"
