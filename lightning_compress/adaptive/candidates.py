"""Per-layer candidates: (sparsity, width, granularity), each with its exact exported bytes, its MACs and its
predicted loss increase ``1/2 * sum(F * dW^2)``. No Lightning import.

- Sparsity is unstructured, within the layer, by the saliency ``F * w^2`` (Optimal Brain Damage with the diagonal
  Fisher): the weights whose removal the score itself predicts to cost least go first, so the pruning and the
  score agree. Pruned weights stay zero through quantization (zero maps to code 0).
- Bytes are the weight's as ``save_quantized`` writes them: its codes in the layout the export chooses (dense, or
  a bitmap / gaps plus the kept codes where that is smaller: :func:`~lightning_compress.quantization.sparse_layout.
  nbytes`) plus float32 scales, so a sparser quantized candidate is cheaper in bytes too, by exactly what the file
  saves; a float weight at its own element size, once more per tied alias (float weights are stored dense: a pruned
  float candidate saves MACs only).
- MACs are the nonzero weights times the positions each is applied at per example (the count a sparse kernel
  executes; an embedding lookup has none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.quantization import sparse_layout
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec, quantize_tensor

WIDTHS = (2, 3, 4, 6, 8, FLOAT_BITS)  # FLOAT_BITS: the layer stays float
GROUP_SIZES = (32, 128)  # per-group candidates where the size divides the layer's input (and is smaller than it)
SPARSITIES = (0.0, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class Candidate:
    """One way to store one layer. ``bits`` is ``FLOAT_BITS`` for float (``granularity`` is then None)."""

    layer: str
    bits: int
    granularity: str | None
    group_size: int | None
    sparsity: float
    nbytes: int
    macs: int
    score: float  # predicted loss increase, 1/2 * sum(F * dW^2)

    def spec(self, calibration: str) -> QuantSpec | None:
        if self.bits == FLOAT_BITS or self.granularity is None:
            return None
        return QuantSpec(self.bits, self.granularity, self.group_size or 128, True, calibration)

    def label(self) -> str:
        width = "float" if self.bits == FLOAT_BITS else f"int{self.bits}"
        grain = "" if self.granularity is None else \
            f" g{self.group_size}" if self.granularity == "per_group" else " per-channel"
        return f"{width}{grain}" + (f" {self.sparsity:.0%} sparse" if self.sparsity else "")


def granularities(weight: Tensor) -> list[tuple[str, int | None]]:
    """Per channel always; per group for each of :data:`GROUP_SIZES` that divides the input size and is smaller."""
    inputs = weight[0].numel()
    return [("per_channel", None)] + [("per_group", g) for g in GROUP_SIZES if inputs % g == 0 and g < inputs]


def prune(weight: Tensor, fisher: Tensor, sparsity: float) -> Tensor:
    """``weight`` with the ``sparsity`` fraction of lowest ``F * w^2`` entries set to zero (a new tensor)."""
    drop = math.floor(sparsity * weight.numel())
    if drop == 0:
        return weight.detach().clone()
    saliency = (fisher * weight.detach().float().square()).reshape(-1)
    order = torch.argsort(saliency, stable=True)  # ties: lowest index first, the same on every run
    pruned = weight.detach().clone().reshape(-1)
    pruned[order[:drop]] = 0
    return pruned.reshape(weight.shape)


def realise(weight: Tensor, fisher: Tensor, candidate: Candidate, calibration: str) -> tuple[Tensor,
                                                                                            QuantizedTensor | None]:
    """The candidate's weight (pruned, then dequantized) and its codes (None for a float candidate)."""
    pruned = prune(weight, fisher, candidate.sparsity)
    spec = candidate.spec(calibration)
    if spec is None:
        return pruned, None
    qtensor = quantize_tensor(pruned, spec)
    return qtensor.dequantize(), qtensor


def layer_candidates(
    name: str, module: nn.Module, weight: Tensor, fisher: Tensor, positions: float, aliases: int,
    calibration: str, widths: Sequence[int] = WIDTHS, sparsities: Sequence[float] = SPARSITIES,
) -> list[Candidate]:
    """Every candidate of one layer, scored. ``positions``: where each weight is applied per example (0 for an
    embedding); ``aliases``: other ``state_dict`` keys tied to this weight (stored again only when it stays float)."""
    float_bytes = weight.numel() * weight.element_size() * (1 + aliases)
    out = []
    for sparsity in sparsities:
        pruned = prune(weight, fisher, sparsity)
        macs = round(int(torch.count_nonzero(pruned)) * positions)
        for bits in widths:
            grains = [(None, None)] if bits == FLOAT_BITS else granularities(weight)
            for granularity, group in grains:
                probe = Candidate(name, bits, granularity, group, sparsity, 0, macs, 0.0)
                spec = probe.spec(calibration)
                if spec is None:
                    approx, nbytes = pruned, float_bytes
                else:
                    qtensor = quantize_tensor(pruned, spec)
                    approx = qtensor.dequantize()
                    nbytes = sparse_layout.nbytes(qtensor)
                score = 0.5 * float((fisher * (approx.float() - weight.detach().float()).square()).sum())
                out.append(Candidate(name, bits, granularity, group, sparsity, nbytes, macs, score))
    return out
