"""The budget for one model (:mod:`lightning_compress.adaptive.caps`): caps in bytes and MACs per example, and the
refusal of a budget below the model's floor (random weights: arithmetic only)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.caps import budget_caps
from lightning_compress.core.accounting import state_bytes


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0])


BATCH = (torch.randn(8, 64), torch.zeros(8, dtype=torch.long))
DENSE = 64 * 64 + 64 * 32 + 32 * 10


def test_caps_are_the_budget_in_bytes_and_macs_per_example() -> None:
    model = _mlp()
    caps = budget_caps(model, Budget(size=0.3, macs=0.5), BATCH, _forward)
    assert caps.size_cap == math.floor(0.3 * sum(state_bytes(model).values()))
    assert caps.macs_cap == math.floor(0.5 * DENSE)  # a Linear applies each weight once per example
    assert caps.where == {"0": 1.0, "2": 1.0, "4": 1.0}
    assert caps.fixed_bytes == (64 + 32 + 10) * 4  # the biases


@pytest.mark.parametrize(("budget", "match"), [
    (Budget(size=500), r"`budget` size=500 \(500 bytes\) is below the floor of this model"),
    (Budget(size=0.01), r"`budget` size=0.01 \(\d+ bytes\) is below the floor"),
    (Budget(macs=100), r"`budget` macs=100 \(100 MACs per example\) is below the floor of this model"),
    (Budget(macs=0.05), r"`budget` macs=0.05 \(\d+ MACs per example\) is below the floor"),
])
def test_a_budget_below_the_floor_is_refused(budget: Budget, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        budget_caps(_mlp(), budget, BATCH, _forward)


def test_a_macs_budget_needs_an_example_batch() -> None:
    with pytest.raises(ValueError, match=r"`budget` macs=0\.5 counts MACs per example, which needs an example batch"):
        budget_caps(_mlp(), Budget(macs=0.5))


def test_without_a_batch_no_position_is_counted() -> None:
    assert set(budget_caps(_mlp(), Budget(size=0.5)).where.values()) == {0.0}


def test_the_cheapest_plan_is_priced_between_the_floor_and_its_file() -> None:
    """``estimate=True`` prices every layer at int2, 90 % sparse: above the floor (it stores codes), and not above
    the file of the cheapest plan compress() measures on the same weights (that file adds the header)."""
    from lightning_compress import compress
    from lightning_compress.adaptive.plan import floor_bytes
    from lightning_compress.adaptive.session import BudgetError

    model = _mlp()
    assert budget_caps(model, Budget(size=0.5)).cheapest is None  # only priced when asked
    caps = budget_caps(model, Budget(size=0.5), estimate=True)
    weights = {n: m.weight for n, m in model.named_children() if isinstance(m, nn.Linear)}
    assert caps.cheapest is not None and caps.cheapest > floor_bytes(weights, caps.fixed_bytes)
    with pytest.raises(BudgetError) as info:
        compress(model, Budget(size=caps.fixed_bytes + 600), [BATCH], calibration_batches=1)
    smallest = int(str(info.value).split("can be written as is ")[1].split(" bytes")[0])
    assert caps.cheapest <= smallest


def test_a_layer_outside_prunable_counts_dense_in_the_macs_floor() -> None:
    """A fit prunes only the layers it tracks: the first Linear left dense makes the floor its 64 * 64 MACs plus
    the other layers at 90 % sparsity, and a cap between that and the all-layers floor is refused."""
    everywhere = math.ceil(0.1 * 64 * 64) + math.ceil(0.1 * 64 * 32) + math.ceil(0.1 * 32 * 10)
    untracked_dense = 64 * 64 + math.ceil(0.1 * 64 * 32) + math.ceil(0.1 * 32 * 10)
    assert budget_caps(_mlp(), Budget(macs=everywhere), BATCH, _forward).macs_cap == everywhere
    with pytest.raises(ValueError, match=rf"below the floor of this model: {untracked_dense} MACs .*the layers not "
                                         "pruned dense"):
        budget_caps(_mlp(), Budget(macs=untracked_dense - 1), BATCH, _forward, prunable=["2", "4"])
    assert budget_caps(_mlp(), Budget(macs=untracked_dense), BATCH, _forward, prunable=["2", "4"]).macs_cap == \
        untracked_dense
    # the estimate prices the untracked layer dense too: larger than with every layer pruned
    assert budget_caps(_mlp(), Budget(size=0.5), estimate=True, prunable=["2", "4"]).cheapest > \
        budget_caps(_mlp(), Budget(size=0.5), estimate=True).cheapest  # type: ignore[operator]


def _wide_output() -> nn.Sequential:
    """Most MACs in the output layer, which loses no unit: whole units reach far less than 90 % sparsity does."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 256))


def test_a_latency_fit_prices_the_macs_floor_on_whole_units() -> None:
    """The fit removes whole units only (the hidden layer down to its fewest kept, 8 of 32; the output layer loses
    its input columns): 64 * 8 + 8 * 256 MACs. The unstructured floor alone accepted a cap below that (review 10 G),
    which then failed only after the whole fit."""
    budget = Budget(latency=0.6, latency_input=(4, 64), macs=0.2)
    dense = 64 * 32 + 32 * 256
    assert budget_caps(_wide_output(), budget, BATCH, _forward).macs_cap == math.floor(0.2 * dense)  # no units
    with pytest.raises(ValueError, match=rf"macs=0.2 \({math.floor(0.2 * dense)} MACs per example\) is below what "
                                         rf"whole units can reach.*latency=0.6: {64 * 8 + 8 * 256} MACs"):
        budget_caps(_wide_output(), budget, BATCH, _forward, units_shape=(4, 64))
    wider = Budget(latency=0.6, latency_input=(4, 64), macs=0.3)  # above the units' floor: accepted
    assert budget_caps(_wide_output(), wider, BATCH, _forward, units_shape=(4, 64)).macs_cap == math.floor(0.3 * dense)
