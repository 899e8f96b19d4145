"""The diagonal Fisher: E[g^2] against a hand computation, the sampled default reproducible, the model left as it
was, bad losses refused. Random tensors: unit tests of the arithmetic."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress.adaptive.fisher import diagonal_fisher
from lightning_compress.quantization.calibration import feed


def _setup() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]
    return model, batches


def test_fisher_is_the_mean_squared_batch_gradient() -> None:
    model, batches = _setup()
    weights = {"0": model[0].weight, "2": model[2].weight}

    def loss_fn(output: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(output, batch[1])

    fisher = diagonal_fisher(model, weights, batches, feed, loss_fn)
    expected = {name: torch.zeros_like(w) for name, w in weights.items()}
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(weights.values()))
        for name, grad in zip(weights, grads):
            expected[name] += grad.square() / len(batches)
    for name in weights:
        assert torch.allclose(fisher[name], expected[name], rtol=1e-5, atol=1e-12)
        assert bool((fisher[name] > 0).any())


def test_the_sampled_default_is_reproducible_and_leaves_the_model_as_it_was() -> None:
    model, batches = _setup()
    model.train()
    model[0].weight.requires_grad_(False)
    weights = {"0": model[0].weight, "2": model[2].weight}
    first = diagonal_fisher(model, weights, batches, feed)
    second = diagonal_fisher(model, weights, batches, feed)
    assert all(torch.equal(first[n], second[n]) for n in weights)
    assert all(bool((first[n] > 0).any()) for n in weights)
    assert model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("loss", "error", "text"), [
    (lambda out, b: out.sum(0), TypeError, "scalar"),
    (lambda out, b: 3.0, TypeError, "float"),
    (lambda out, b: out.sum() * float("nan"), ValueError, "not finite"),
])
def test_bad_losses_are_refused(loss: Any, error: type[Exception], text: str) -> None:
    model, batches = _setup()
    with pytest.raises(error, match=text):
        diagonal_fisher(model, {"0": model[0].weight}, batches, feed, loss)



def test_an_embedding_row_never_looked_up_gets_no_fisher() -> None:
    model = nn.Embedding(10, 4)
    fisher = diagonal_fisher(model, {"e": model.weight}, [torch.tensor([[1, 2]])], feed)["e"]
    assert fisher.reshape(10, -1).any(dim=1).tolist() == [i in (1, 2) for i in range(10)]
