"""One pruning event end to end without a Trainer: plain callables stand in for the metric and the broadcast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.core.gate import MetricGate
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.run import FitDivergedError, PruningRun
from lightning_compress.pruning.schedule import PruningSchedule
from lightning_compress.pruning.tracked import TrackedLayers


def _run(bound: float | None, metrics: list[float]) -> tuple[PruningRun, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    config = PruningConfig(sparsity=0.5, criterion="magnitude", schedule="one_shot", start_step=1)
    schedule = PruningSchedule("one_shot", sparsity=0.5, start=1)
    layers = TrackedLayers({"0": model[0], "2": model[2]})
    run = PruningRun(config, MetricGate(bound), "previous", model, layers, schedule)
    run.start_statistics()
    run.state.bind()
    values = iter(metrics)
    run.evaluate = lambda: next(values)  # type: ignore[attr-defined]
    return run, model


def test_an_accepted_event_prunes_half_and_clears_optimizer_momentum() -> None:
    run, model = _run(bound=0.05, metrics=[0.90, 0.88])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 6)).sum().backward()
    optimizer.step()
    assert run.controller.due(1, run.schedule)
    entry = run.event(1, 1, run.evaluate, optimizers=[optimizer])  # type: ignore[attr-defined]
    assert entry is not None and entry["accepted"] and entry["drop"] == 0.90 - 0.88
    assert abs(run.state.sparsity() - 0.5) < 0.02
    for name, mask in run.state.masks.items():
        param = dict(model.named_parameters())[name]
        assert bool((param[~mask] == 0).all())
        assert bool((optimizer.state[param]["momentum_buffer"][~mask] == 0).all())


def test_a_refused_event_restores_weights_and_masks_bit_for_bit() -> None:
    run, model = _run(bound=0.01, metrics=[0.90, 0.70])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run.controller.due(1, run.schedule)
    entry = run.event(1, 1, run.evaluate)  # type: ignore[attr-defined]
    assert entry is not None and not entry["accepted"] and run.state.masks == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_broadcast_decides_what_every_rank_applies() -> None:
    run, model = _run(bound=None, metrics=[0.9, 0.9])
    rank_zero = {"0.weight": torch.zeros(8, 6, dtype=torch.bool), "2.weight": torch.ones(3, 8, dtype=torch.bool)}
    run.controller.due(1, run.schedule)
    run.event(1, 1, run.evaluate, broadcast=lambda masks: (rank_zero, {}))  # type: ignore[attr-defined]
    assert bool((model[0].weight == 0).all()) and bool((model[2].weight != 0).all())


def test_state_round_trips() -> None:
    run, _ = _run(bound=None, metrics=[0.9, 0.9])
    run.controller.due(1, run.schedule)
    run.event(1, 1, run.evaluate)  # type: ignore[attr-defined]
    other, _ = _run(bound=None, metrics=[])
    other.load_state_dict(run.state_dict())
    assert other.controller.history == run.controller.history
    assert all(torch.equal(other.state.masks[k], m) for k, m in run.state.masks.items())


@pytest.mark.parametrize(("poison", "metrics", "texts"), [
    ("weight", [0.9, 0.9], ("weights are not finite", "step 7", "2.bias", "fit diverged")),
    ("metric", [float("nan"), 0.9], ("validation metric is not finite (nan)", "step 7", "fit diverged")),
], ids=["nan_weight", "nan_metric"])
def test_a_model_not_finite_before_the_event_is_an_error_of_the_fit(poison: str, metrics: list[float],
                                                                    texts: tuple[str, ...]) -> None:
    run, model = _run(bound=None, metrics=metrics)
    if poison == "weight":
        with torch.no_grad():
            model[2].bias[1] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run.controller.due(1, run.schedule)
    with pytest.raises(FitDivergedError) as info:
        run.event(1, 7, run.evaluate)  # type: ignore[attr-defined]
    for text in texts:
        assert text in str(info.value), f"{text!r} missing from: {info.value}"
    assert run.controller.history == [] and run.state.masks == {}  # no event recorded, nothing pruned
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
