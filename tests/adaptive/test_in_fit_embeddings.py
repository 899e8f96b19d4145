"""The in-fit sparsity planner on a model whose embedding table is a large share of a size budget (any transformer
taking token ids): found end to end with a BERT (tests/integration/test_adaptive_transformer.py), where every
tracked layer was pruned to the largest sparsity although a dense plan fitted the budget.

Diagnosis: ``SparsityPlanner.__call__`` (adaptive/in_fit.py) prices the model's other state with
``fixed_bytes(model, keys)`` over the *tracked* layers' keys only, so an ``nn.Embedding`` (not tracked by the
pruning, but quantized at the end of the fit like every Linear / Conv / Embedding weight) is counted at its fp32
bytes. When that alone exceeds the cap, no plan fits, and the planner's fallback prunes every tracked layer to
``FLOOR_SPARSITY`` (0.9). ``budget_caps`` (adaptive/caps.py) prices the same model with every quantizable layer
as a planned weight, so the two disagree about the same budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.caps import budget_caps
from lightning_compress.adaptive.in_fit import SparsityPlanner
from lightning_compress.adaptive.plan import FLOOR_SPARSITY


class TokenClassifier(nn.Module):
    """A token table much larger than the layers after it, as in a small transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 32)
        self.hidden = nn.Linear(32, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(ids).mean(1))))


@pytest.mark.xfail(strict=True, reason="adaptive/in_fit.py SparsityPlanner prices untracked embeddings at fp32 "
                   "(fixed_bytes over the tracked keys only): see the module docstring")
def test_a_budget_a_dense_int8_plan_meets_is_not_planned_as_the_largest_sparsity_everywhere() -> None:
    torch.manual_seed(0)
    model = TokenClassifier()
    budget = Budget(size=0.4)  # int8 everywhere (one scale per row) takes about 0.29 of the fp32 tensors
    caps = budget_caps(model, budget)
    int8 = sum(w.numel() + 4 * w.shape[0] for w in (model.embed.weight, model.hidden.weight, model.head.weight))
    floats = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("bias"))
    assert caps.size_cap is not None and int8 + floats < caps.size_cap  # a dense int8 plan fits the budget
    tracked = {"hidden": model.hidden, "head": model.head}  # what the pruning tracks: Linear layers
    fisher = {name: torch.ones_like(module.weight) for name, module in tracked.items()}
    plan = SparsityPlanner(model, tracked, caps)(fisher)
    assert min(plan.values()) < FLOOR_SPARSITY, plan
