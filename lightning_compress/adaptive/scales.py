"""Per-layer scale of the predicted scores, measured once per layer before solving. No Lightning import.

The diagonal Fisher ranks one layer's candidates well but can be off in scale from one layer to the next (it
ignores how a layer's errors add up through the rest of the network). Before solving, each layer's reference
candidate (its cheapest 4-bit one, else the cheapest with a nonzero score) is written into the model alone and
the loss change is measured on the calibration batches: the KL divergence of the changed model's outputs to the
float model's (with ``loss_fn``: the loss increase). Every score of that layer is multiplied by measured /
predicted. A layer whose measurement is not positive (noise) gets the median ratio of the others. Cost: one pass
over the calibration batches per layer, without gradients.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress.adaptive.candidates import Candidate, realise
from lightning_compress.adaptive.fisher import first_tensor

REFERENCE_BITS = 4


def reference(options: Sequence[Candidate]) -> Candidate | None:
    """The candidate a layer's scale is measured on."""
    scored = [c for c in options if c.score > 0 and c.sparsity == 0]
    four = [c for c in scored if c.bits == REFERENCE_BITS]
    return min(four or scored, key=lambda c: c.nbytes) if scored else None


def _loss_change(outputs: Sequence[Tensor], model: nn.Module, batches: Sequence[Any],
                 forward: Callable[[nn.Module, Any], Any], loss_fn: Callable[[Any, Any], Tensor] | None) -> float:
    total = 0.0
    with torch.no_grad():
        for base, batch in zip(outputs, batches):
            output = forward(model, batch)
            if loss_fn is None:
                new = first_tensor(output).float()
                new = new.reshape(-1, new.shape[-1])
                total += float(F.kl_div(torch.log_softmax(new, -1), torch.log_softmax(base, -1), log_target=True,
                                        reduction="batchmean"))
            else:
                total += float(loss_fn(output, batch)) - float(base)
    return total / len(batches)


def measured_scales(
    model: nn.Module, weights: Mapping[str, Tensor], fisher: Mapping[str, Tensor],
    candidates: Mapping[str, Sequence[Candidate]], batches: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any], loss_fn: Callable[[Any, Any], Tensor] | None, calibration: str,
) -> dict[str, float]:
    """Per layer, measured / predicted loss change of its reference candidate (the model is left as it was)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = []
            for batch in batches:
                output = forward(model, batch)
                if loss_fn is None:
                    logits = first_tensor(output).float()
                    outputs.append(logits.reshape(-1, logits.shape[-1]))
                else:
                    outputs.append(loss_fn(output, batch).detach())
        ratios: dict[str, float | None] = {}
        for name, options in candidates.items():
            chosen = reference(options)
            if chosen is None:
                ratios[name] = None
                continue
            original = weights[name].detach().clone()
            approx, _ = realise(original, fisher[name], chosen, calibration)
            try:
                with torch.no_grad():
                    weights[name].copy_(approx)
                change = _loss_change(outputs, model, batches, forward, loss_fn)
            finally:
                with torch.no_grad():
                    weights[name].copy_(original)
            ratios[name] = change / chosen.score if change > 0 else None
    finally:
        model.train(training)
    known = [r for r in ratios.values() if r is not None]
    fallback = statistics.median(known) if known else 1.0
    return {name: fallback if r is None else r for name, r in ratios.items()}
