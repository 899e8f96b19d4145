"""Diagonal Fisher ``F = E[g^2]`` of chosen weights, from a few backward passes on calibration data.

The predicted loss increase of a change ``dW`` to a weight is then about ``1/2 * sum(F * dW^2)`` (the
second-order term of the loss around a trained model, with the Fisher standing in for the Hessian), whatever the
change is: rounding, pruning or both. That makes one currency for every per-layer choice.

``g`` is the gradient of each batch's mean loss: of ``loss_fn(output, batch)`` when given, else of the
cross-entropy of the output (its last dimension read as logits) against labels *drawn from the model's own
softmax*. The second is the sampled (true) Fisher, the Hessian of the KL divergence of the model to its own
outputs: no labels needed. For outputs that are not logits (embeddings, regression) pass ``loss_fn``. A batch
gradient's square is the per-example Fisher divided by the batch size plus the squared mean gradient; the factor is
common to every layer, so the ranking of candidates and the plan do not depend on it. An embedding's rows that no
calibration batch looks up get no Fisher: their error costs nothing in the score (filling them with the seen rows'
mean was tried on all-MiniLM-L6-v2 and lowered the evaluation sentences' min cosine at 0.15x, so it is not done).
No Lightning import.

WHY the end of an ``AdaptiveCompression`` fit plans its widths on this Fisher too, and not on the fit's own gradient
statistics (``E[g^2] = mean^2 + var`` per weight, :func:`~lightning_compress.adaptive.in_fit.statistics_fisher`,
which plan the sparsities during the fit and cost next to nothing at its end): measured side by side on the masks
reached (``benchmarks/bench_adaptive_fisher.py``, ``benchmarks/results/adaptive_fisher.json``: the built-in SmallCNN
job on five seeds, the ResNet-18-style CNN on two), the statistics did not rank the width candidates consistently as
well against the measured loss change (lower on most SmallCNN seeds, about even on the ResNet), and their layers'
scale against the measured one, which is what the knapsack trades between layers, was further off on every run; the
plans they led to delivered no better test accuracy (worse at the ResNet's smallest budget on one seed). They are
also the statistics of the weights before the last pruning events (they stop counting at the last event), not of the
model being quantized, and the backward passes cost a small fraction of the fit (figures in the results file). A
factor common to every layer (the fit's true-label batch gradients against a sampled Fisher) would not matter: the
plan and its correction read only the layers' relative scale (``tests/adaptive/test_fisher_scale.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

FISHER_SEED = 0  # labels drawn from the model's softmax come from this seed: the same plan on every run


def first_tensor(output: Any) -> Tensor:
    """The tensor a default loss reads: the output itself, or the first tensor of a tuple / dict / ModelOutput."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value
    raise TypeError(f"the model's output ({type(output).__name__}) holds no float tensor to read as logits; pass "
                    "`loss_fn(output, batch) -> scalar tensor`")


def sampled_loss(output: Any, generator: torch.Generator) -> Tensor:
    """Cross-entropy of the output's last dimension against labels drawn from its own softmax."""
    logits = first_tensor(output)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    with torch.no_grad():
        probs = torch.softmax(flat, dim=-1).cpu()
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(flat.device)
    return F.cross_entropy(flat, labels)


def diagonal_fisher(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    batches: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
) -> dict[str, Tensor]:
    """``F`` for each of ``weights`` (name -> parameter of ``model``), averaged over ``batches``; float32, on the
    weight's device. The model's mode and ``requires_grad`` flags are restored and its ``.grad`` left untouched."""
    generator = torch.Generator().manual_seed(FISHER_SEED)
    params = list(weights.values())
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    flags = [p.requires_grad for p in params]
    training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            output = forward(model, batch)
            loss = sampled_loss(output, generator) if loss_fn is None else loss_fn(output, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}"
                                f"{'' if not isinstance(loss, Tensor) else ' of shape ' + str(tuple(loss.shape))}")
            if not bool(torch.isfinite(loss)):
                raise ValueError(f"the calibration loss is not finite ({float(loss)}): check `calibration_data` "
                                 "and `loss_fn`")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for (name, _), grad in zip(weights.items(), grads):
                if grad is not None:
                    sums[name] += grad.detach().float().square()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(training)
    return {name: total / len(batches) for name, total in sums.items()}

