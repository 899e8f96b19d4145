"""``LatencyRun``'s events with the deferred gate (adaptive/in_fit_units.py + adaptive/recovery_gate.py), driven
without a Trainer: plain callables stand in for the metric, and a stand-in planner (the ONNX Runtime table is not
what is tested here) records the caps it is given. An event is held; the next event's metric (measured after the
training since) keeps it or undoes it and caps its families in the plan solved again; the end of the fit settles
the last one; the held event goes through a checkpoint."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lightning_compress.adaptive.in_fit_units import LatencyRun
from lightning_compress.core.gate import MetricGate
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.schedule import PruningSchedule
from lightning_compress.pruning.tracked import TrackedLayers
from lightning_compress.structure.dependency import find_unit_groups

PLANNED = {"0": 4, "3": 4}  # units each conv family keeps at the end of the ramp


class _Planner:
    """Stands in for ``LatencyPlanner``: the same kept counts every time, never below a cap."""

    def __init__(self) -> None:
        self.problem = SimpleNamespace(members={"0": ["0"], "3": ["3"]},
                                       scores={"0": torch.arange(8.0).double(), "3": torch.arange(8.0).double()})
        self.caps: list[dict[str, int]] = []

    def __call__(self, names: Any, groups: Any, fisher: Any, current: Any, final: bool,
                 caps: dict[str, int] | None = None) -> dict[str, int]:
        self.caps.append(dict(caps or {}))
        return {n: max(k, (caps or {}).get(n, 0)) for n, k in PLANNED.items()}


def _run() -> tuple[LatencyRun, nn.Module, _Planner]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    config = PruningConfig(sparsity=0.9, criterion="taylor", structured=True, compact=True, scope="layer",
                           statistics="per_unit")
    layers = TrackedLayers({"0": model[0], "3": model[3]})
    run = LatencyRun(config, MetricGate(0.02), "initial", model, layers, PruningSchedule("polynomial", 1.0, 1, 5, 1))
    run.state.groups = find_unit_groups(model, torch.randn(2, 1, 6, 6))
    run.start_statistics()
    run.state.bind()
    model(torch.randn(4, 1, 6, 6)).sum().backward()
    run.collect()
    run.planner = _Planner()  # type: ignore[assignment]
    return run, model, run.planner  # type: ignore[return-value]


def _train(model: nn.Module, run: LatencyRun) -> None:
    """A stand-in for the training between two events: every weight moves, the masks hold."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    run.state.apply()


def _kept(run: LatencyRun) -> dict[str, int]:
    return {n: int(run.state.unit_masks[n].sum()) if n in run.state.unit_masks else 8 for n in ("0", "3")}


def test_an_event_is_held_then_kept_when_the_metric_recovered() -> None:
    run, model, planner = _run()
    first = run.event(2, 2, lambda: 0.90)
    assert first is not None and first["accepted"] and "held" in first["note"] and first["metric_after"] is None
    assert len(run.recovery.held) == 1 and _kept(run) == {"0": 6, "3": 6}  # 8 - 4 * 0.578, rounded
    _train(model, run)
    run.validated = True  # the event runs right after a validation: its metric judges the held one
    second = run.event(3, 3, lambda: 0.89)  # within 0.02 of 0.90 after recovery: kept, the ramp goes on
    assert second is not None and second["accepted"] and _kept(run) == PLANNED
    assert run.recovery.caps == {} and planner.caps[-1] == {}
    assert "kept" in run.recovery.log[0] and "steps [2]" in run.recovery.log[0]


def test_a_validation_too_soon_after_the_event_leaves_it_held_for_a_later_one() -> None:
    run, model, _ = _run()
    run.schedule = PruningSchedule("polynomial", 1.0, 2, 6, 2)  # events every 2 ticks
    run.event(4, 4, lambda: 0.90)
    run.validated = True
    assert run.event(5, 5, lambda: 1 / 0) is None  # one tick of training: not measured, not judged
    assert len(run.recovery.held) == 1 and run.controller.retry_at is not None  # the next validation comes back
    _train(model, run)
    run.event(6, 6, lambda: 0.95)  # two ticks (the schedule's interval): judged, kept; the ramp's end pruned
    assert run.recovery.log[0].startswith("events at steps [4]") and "kept" in run.recovery.log[0]


def test_an_event_outside_the_bound_after_recovery_is_undone_and_replanned_with_its_families_capped() -> None:
    run, model, planner = _run()
    at_event = {k: v.clone() for k, v in model.state_dict().items()}
    run.event(2, 2, lambda: 0.90)  # 8 -> 6 units in each family
    pruned = {n: ~m for n, m in run.state.masks.items()}
    _train(model, run)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    run.validated = True
    entry = run.event(3, 3, lambda: 0.80)  # 10 points below the reference after recovery
    assert run.recovery.caps == {"0": 7, "3": 7} and planner.caps[-1] == {"0": 7, "3": 7}  # halfway back
    undone = run.controller.history[1]
    assert not undone["accepted"] and undone["step"] == 2 and undone["metric_after"] == 0.80
    assert "after recovery" in undone["reason"] and "undone" in undone["note"]
    assert entry is not None and entry["accepted"] and "undone" in entry["note"]  # the plan again, held in turn
    assert _kept(run) == {"0": 7, "3": 7} and len(run.recovery.held) == 1
    now = model.state_dict()
    for name, gone in pruned.items():
        back = gone & run.state.masks[name]  # pruned at step 2, kept by the new plan
        assert bool(back.any()), name
        assert torch.equal(now[name][back], at_event[name][back]), name  # as they were at the event
        assert torch.equal(now[name][~gone], trained[name][~gone]), name  # the rest keeps its training
    assert [h["accepted"] for h in run.controller.history] == [True, False, True]


def test_the_end_of_the_fit_settles_the_last_held_event() -> None:
    run, model, _ = _run()
    run.event(2, 2, lambda: 0.90)
    _train(model, run)
    assert run.settle(0.95) is None and run.recovery.held == [] and _kept(run) == {"0": 6, "3": 6}
    run.event(3, 3, lambda: 0.95)  # the last step, held
    entry = run.settle(0.5)  # what settle_last does before the masks are frozen
    assert entry is not None and not entry["accepted"] and _kept(run) == {"0": 6, "3": 6}


def test_a_held_event_goes_through_a_checkpoint() -> None:
    run, model, _ = _run()
    run.event(2, 2, lambda: 0.90)
    _train(model, run)
    resumed, copy_of_model, _ = _run()
    copy_of_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(run.state_dict())
    assert [h.step for h in resumed.recovery.held] == [2]
    for r in (run, resumed):
        r.validated = True
        r.event(3, 3, lambda: 0.5)
    assert resumed.recovery.caps == run.recovery.caps == {"0": 7, "3": 7}
    for key, value in model.state_dict().items():
        assert torch.equal(value, copy_of_model.state_dict()[key]), key


def test_when_the_fit_validates_right_after_each_event_the_next_event_judges_with_a_fresh_metric() -> None:
    run, model, _ = _run()
    run.event(2, 2, lambda: 0.90)
    _train(model, run)
    run.event(3, 3, lambda: 1 / 0)  # no validation came after the event at 2: held with it, unmeasured
    assert [h.tick for h in run.recovery.held] == [2, 3]
    run.validated_at = 3  # the validation at the same step as the event at 3 measured none of its recovery
    _train(model, run)
    run.event(4, 4, lambda: 0.5)  # the schedule's next event: measured now, the newest undone
    assert run.recovery.log[-1].startswith("events at steps [2, 3]") and "(step 3) undone" in run.recovery.log[-1]
