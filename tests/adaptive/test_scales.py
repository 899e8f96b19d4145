"""Per-layer measured scales: measured / predicted of the reference candidate, the KL computed by hand, a layer
the output ignores falls back to the median, the model left as it was. Random tensors: arithmetic tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress.adaptive.candidates import layer_candidates, realise
from lightning_compress.adaptive.fisher import diagonal_fisher
from lightning_compress.adaptive.scales import measured_scales, reference
from lightning_compress.quantization.calibration import feed


class TwoHeads(nn.Module):
    """``a -> b`` produce the output; ``unused`` runs but the output does not depend on it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        self.unused(x)
        return self.b(torch.relu(self.a(x)))


def test_scales_are_measured_over_predicted_and_the_model_is_left_as_it_was() -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    batches = [torch.randn(16, 8) for _ in range(2)]
    weights = {n: getattr(model, n).weight for n in ("a", "b", "unused")}
    before = {n: w.detach().clone() for n, w in weights.items()}
    fisher = diagonal_fisher(model, weights, batches, feed)
    fisher["unused"] = torch.ones_like(fisher["unused"])  # a score without any effect on the output
    candidates = {n: layer_candidates(n, getattr(model, n), w, fisher[n], 1.0, 0, "minmax")
                  for n, w in weights.items()}
    scales = measured_scales(model, weights, fisher, candidates, batches, feed, None, "minmax")
    assert all(torch.equal(before[n], w) for n, w in weights.items())
    chosen = reference(candidates["a"])
    assert chosen is not None and chosen.bits == 4 and chosen.sparsity == 0
    approx, _ = realise(before["a"], fisher["a"], chosen, "minmax")
    with torch.no_grad():
        base = [model(x) for x in batches]
        model.a.weight.copy_(approx)
        kl = sum(float(F.kl_div(torch.log_softmax(model(x), -1), torch.log_softmax(b, -1), log_target=True,
                                reduction="batchmean")) for x, b in zip(batches, base)) / len(batches)
        model.a.weight.copy_(before["a"])
    assert scales["a"] == kl / chosen.score
    assert scales["unused"] == (scales["a"] + scales["b"]) / 2  # no measurable change: the median of the others
