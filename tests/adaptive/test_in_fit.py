"""The pure half of AdaptiveCompression: the budget's caps and floors, the Fisher from the gradient statistics, the
per-layer sparsity plan and its ramp, and the run's state (random tensors: shapes and arithmetic only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.caps import budget_caps
from lightning_compress.adaptive.in_fit import (
    PLAN_MIN_ROWS,
    BudgetRun,
    SparsityPlanner,
    overall,
    ramped,
    sampled_candidates,
    sampled_rows,
    shortfall,
    statistics_fisher,
)
from lightning_compress.adaptive.knapsack import BUCKETS
from lightning_compress.core.gate import MetricGate
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.schedule import PruningSchedule
from lightning_compress.pruning.statistics import GradientStatistics
from lightning_compress.pruning.tracked import TrackedLayers
from tests.adaptive.test_caps import BATCH, _forward, _mlp


def test_the_fisher_of_the_statistics_is_the_mean_squared_gradient() -> None:
    shapes = [torch.Size([4, 3]), torch.Size([2, 4])]
    stats = GradientStatistics(["a", "b"], shapes, per_weight=True, per_unit=False)
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    for step in grads:
        stats.update(step, [torch.ones(s) for s in shapes])
    fisher = statistics_fisher(stats)
    for index, name in enumerate(("a", "b")):
        expected = torch.stack([step[index].square() for step in grads]).mean(0)
        torch.testing.assert_close(fisher[name], expected, rtol=1e-5, atol=1e-6)


def _planner(model: nn.Module, budget: Budget) -> SparsityPlanner:
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return SparsityPlanner(model, modules, budget_caps(model, budget, BATCH, _forward))


def test_the_plan_fits_the_macs_cap_and_the_score_decides_which_layer_loses_more() -> None:
    model = _mlp()
    planner = _planner(model, Budget(macs=0.5))
    fisher = {"0": torch.full((64, 64), 1e-6), "2": torch.full((32, 64), 1e3), "4": torch.full((10, 32), 1e3)}
    plan = planner(fisher)
    kept = 64 * 64 * (1 - plan["0"]) + 64 * 32 * (1 - plan["2"]) + 32 * 10 * (1 - plan["4"])
    assert kept <= planner.caps.macs_cap
    assert plan["0"] > plan["2"]  # the layer whose weights the loss hardly feels is pruned harder


def test_the_plan_never_asks_a_layer_for_less_than_it_has_pruned() -> None:
    model = _mlp()
    with torch.no_grad():
        model[0].weight[:, :40] = 0  # 62.5 % of the layer pruned already
    plan = _planner(model, Budget(macs=0.9))({n: torch.ones_like(m.weight) for n, m in
                                             model.named_modules() if isinstance(m, nn.Linear)})
    assert plan["0"] >= 40 / 64


def test_the_ramp_gives_each_layer_its_target_times_the_progress() -> None:
    plan = {"a": 0.9, "b": 0.0, "c": 0.5}
    assert ramped(plan, 0.25, 0.5) == {"a": 0.45, "b": 0.0, "c": 0.25}
    assert ramped(plan, 0.8, 0.5) == plan  # never beyond the plan
    assert ramped(plan, 0.3, 0.0) == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert overall({"a": 0.5, "b": 0.0}, {"a": 300, "b": 100}) == pytest.approx(0.375)
    assert shortfall({"a": 0.5, "b": 0.2}, {"a": 0.5, "b": 0.1}) == {"b": (0.2, 0.1)}


def _run(model: nn.Module) -> BudgetRun:
    layers = TrackedLayers({n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    config = PruningConfig(sparsity=0.9, criterion="taylor", scope="layer", statistics="per_weight")
    run = BudgetRun(config, MetricGate(None, True), "initial", model, layers)
    run.schedule = PruningSchedule("polynomial", 1.0, 1, 11, 1)
    run.start_statistics()
    return run


def test_the_run_targets_the_planned_sparsity_times_the_schedules_progress_and_prunes_per_layer() -> None:
    model = _mlp()
    run = _run(model)
    run.planner = lambda fisher: {"0": 0.8, "2": 0.4, "4": 0.0}
    weights = run.layers.weights()
    run.collect()  # no step counted yet: nothing to plan from
    for _ in range(2):
        for w in weights:
            w.grad = torch.randn_like(w)
        run.collect()
    target = run._target(11)  # the ramp's end
    assert run.replans == 1
    assert target == pytest.approx(overall({"0": 0.8, "2": 0.4, "4": 0.0}, {"0": 4096, "2": 2048, "4": 320}))
    masks, _ = run.plan(target)
    reached = {n: 1 - float(masks[f"{n}.weight"].float().mean()) for n in ("0", "2", "4")}
    assert reached == pytest.approx({"0": 0.8, "2": 0.4, "4": 0.0}, abs=1e-3)
    run.controller.sparsity_cap = 0.1
    assert run._target(12) == 0.1  # a back-off's cap holds


def test_the_runs_plan_survives_a_checkpoint() -> None:
    run = _run(_mlp())
    run.plan_by_layer, run.planned_at, run.replans = {"0": 0.5, "2": 0.25, "4": 0.0}, 7, 3
    other = _run(_mlp())
    other.load_state_dict(run.state_dict())
    assert (other.plan_by_layer, other.planned_at, other.replans) == ({"0": 0.5, "2": 0.25, "4": 0.0}, 7, 3)


def test_a_large_layer_is_sampled_on_evenly_spaced_rows_and_a_small_one_not_at_all() -> None:
    assert sampled_rows(torch.zeros(64, 64), 16384) is None  # 4096 weights: every row
    assert sampled_rows(torch.zeros(512, 256), None) is None
    rows = sampled_rows(torch.zeros(512, 256), 16384)
    assert rows is not None and rows.tolist() == torch.linspace(0, 511, 64).round().long().tolist()
    assert rows[0] == 0 and rows[-1] == 511
    narrow = sampled_rows(torch.zeros(100, 4096), 4096)  # one row would hold the elements: the minimum holds
    assert narrow is not None and len(narrow) == PLAN_MIN_ROWS


def _wide() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))


def test_sampled_candidates_estimate_the_full_layers_bytes_macs_and_scores() -> None:
    layer = _wide()[0]
    fisher = torch.rand(256, 256)
    full = sampled_candidates("l", layer, layer.weight, fisher, 1.0, 0, "minmax", (2, 4, 8, 32), None)
    part = sampled_candidates("l", layer, layer.weight, fisher, 1.0, 0, "minmax", (2, 4, 8, 32), 8192)
    assert [(c.sparsity, c.bits, c.granularity, c.group_size) for c in part] == \
        [(c.sparsity, c.bits, c.granularity, c.group_size) for c in full]
    for a, b in zip(part, full):
        if b.bits == 32:
            assert a.nbytes == b.nbytes  # float bytes scale exactly
        assert a.nbytes == pytest.approx(b.nbytes, rel=0.02)
        assert a.macs == pytest.approx(b.macs, rel=0.02)
        assert a.score == pytest.approx(b.score, rel=0.15)


@pytest.mark.parametrize("budget", [Budget(size=0.15, macs=0.5), Budget(size=0.1), Budget(macs=0.3)])
def test_the_sampled_coarser_plan_is_the_plan_of_every_row_at_compress_resolution(budget: Budget) -> None:
    model = _wide()
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    caps = budget_caps(model, budget, (torch.randn(8, 256), torch.zeros(8, dtype=torch.long)), _forward)
    fisher = {"0": torch.rand(256, 256) * 1e-3, "2": torch.rand(64, 256), "4": torch.rand(10, 64) * 10}
    sampled = SparsityPlanner(model, modules, caps)(fisher)
    assert sampled == SparsityPlanner(model, modules, caps, elements=None, buckets=BUCKETS)(fisher)  # as before
    assert sampled["0"] > 0  # the large layer the loss hardly feels is pruned: the test is not of an all-zero plan


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_zero_alone_plans_and_every_rank_takes_its_plan(rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding 10 (DDP): the knapsack ran on every rank and only rank zero's plan was kept. Here a stand-in
    for ``trainer.strategy.broadcast(..., src=0)`` hands every rank what rank zero planned."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *_: rank)
    run = _run(_mlp())
    planned: list[int] = []
    run.planner = lambda fisher: planned.append(rank) or {"0": 0.8, "2": 0.4, "4": 0.0}
    sent: list[object] = []
    rank_zeros = ({"0": 0.5, "2": 0.25, "4": 0.0}, None)
    run.broadcast = lambda mine: sent.append(mine) or rank_zeros  # type: ignore[assignment,method-assign]
    for w in run.layers.weights():
        w.grad = torch.randn_like(w)
    run.collect()
    run.replan()
    assert planned == ([0] if rank == 0 else [])  # the other ranks solve nothing
    assert sent == [({"0": 0.8, "2": 0.4, "4": 0.0}, None) if rank == 0 else None]
    assert run.plan_by_layer == rank_zeros[0] and run.replans == 1
