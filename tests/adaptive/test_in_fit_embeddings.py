"""The in-fit sparsity planner on a model whose embedding table is a large share of a size budget (any transformer
taking token ids): found end to end with a BERT (tests/integration/test_adaptive_transformer.py), where every
tracked layer was pruned to the largest sparsity although a dense plan fitted the budget.

Diagnosis: ``SparsityPlanner.__call__`` (adaptive/in_fit.py) prices the model's other state with
``fixed_bytes(model, keys)`` over the *tracked* layers' keys only, so an ``nn.Embedding`` (not tracked by the
pruning, but quantized at the end of the fit like every Linear / Conv / Embedding weight) is counted at its fp32
bytes. When that alone exceeds the cap, no plan fits, and the planner's fallback prunes every tracked layer to
``FLOOR_SPARSITY`` (0.9). ``budget_caps`` (adaptive/caps.py) prices the same model with every quantizable layer
as a planned weight, so the two disagree about the same budget. The same happened to a Linear the user left out of
the pruning (``exclude=``), quantized at the end all the same.

Fixed: the planner plans every quantizable layer in one problem, an untracked one at sparsity 0, and says when its
floor fallback fires (``SparsityPlanner.fallback``, a warning and the event's note in ``BudgetRun``)."""

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


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))


def token_case() -> tuple[nn.Module, dict[str, nn.Module]]:
    model = TokenClassifier()
    return model, {"hidden": model.hidden, "head": model.head}  # what the pruning tracks: Linear layers


def excluded_case() -> tuple[nn.Module, dict[str, nn.Module]]:
    model = mlp()
    return model, {"2": model[2], "4": model[4]}  # exclude=["0"]: the largest layer, quantized at the end anyway


# (model and tracked layers, size budget): int8 everywhere (one scale per row) takes about 0.26-0.29 of fp32
CASES = {"embedding": (token_case, 0.4), "exclude": (excluded_case, 0.4)}


@pytest.mark.parametrize("case", CASES)
def test_a_budget_a_dense_int8_plan_meets_is_not_planned_as_the_largest_sparsity_everywhere(case: str) -> None:
    torch.manual_seed(0)
    build, size = CASES[case]
    model, tracked = build()
    caps = budget_caps(model, Budget(size=size))
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    int8 = sum(w.numel() + 4 * w.shape[0] for w in weights)
    floats = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("bias"))
    assert caps.size_cap is not None and int8 + floats < caps.size_cap  # a dense int8 plan fits the budget
    fisher = {name: torch.ones_like(module.weight) for name, module in tracked.items()}
    planner = SparsityPlanner(model, tracked, caps)
    plan = planner(fisher)
    assert set(plan) == set(tracked)  # only the tracked layers get a sparsity
    assert min(plan.values()) < FLOOR_SPARSITY, plan
    assert planner.fallback is None


def test_the_floor_fallback_is_said_when_no_plan_fits() -> None:
    torch.manual_seed(0)
    model, tracked = excluded_case()
    caps = budget_caps(model, Budget(size=0.4))
    caps.size_cap = caps.fixed_bytes + 1  # below what any plan costs: only the fallback is left
    planner = SparsityPlanner(model, tracked, caps)
    plan = planner({name: torch.ones_like(module.weight) for name, module in tracked.items()})
    assert plan == {name: FLOOR_SPARSITY for name in tracked}
    assert planner.fallback is not None and "['0']" in planner.fallback and "largest sparsity" in planner.fallback
