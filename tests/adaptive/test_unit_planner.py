"""The latency planner of a fit (adaptive/unit_planner.py): the per-layer ONNX Runtime table is timed once per fit
and every re-plan (the recovery gate's included) is solved on it, so the plan does not move with the machine's
load; the table travels in the checkpoint. ONNX Runtime's timings stand in as a function of each graph's size
(``stand_in_timings``): what is counted here is how often anything is timed, not a speed."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_compress.adaptive import unit_planner
from lightning_compress.adaptive.latency import LatencyTable
from lightning_compress.adaptive.unit_planner import LatencyPlanner, table_from_state, table_state
from tests.adaptive.ddp_latency_gate import stand_in_timings
from tests.adaptive.test_in_fit_units_gate import _run, _train


def test_the_table_goes_through_a_checkpoint_as_it_was() -> None:
    table = LatencyTable(full={"a": (4, 3)}, times={"a": {(4, 3): 1e-3, (2, 3): 6e-4}}, dense=2e-3, graphs=2,
                         int8={"a": {(4, 3): 5e-4}}, int8_models={frozenset({"a"}): 1.5e-3})
    state = table_state(table)
    assert state is not None and all(isinstance(v, (dict, list, float, int)) for v in state.values())
    assert table_from_state(state) == table
    assert table_state(None) is None and table_from_state(None) is None


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(unit_planner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(unit_planner, name, counted)
    return calls


def test_the_table_is_timed_once_and_every_replan_after_a_verdict_solves_on_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Events at ticks 2..5 (the last at progress 1), each judged after recovery: a verdict outside the bound undoes
    the newest and caps its families, and the plan is solved again at every tick up to the end of the schedule and
    after it; the table is timed once, and the last event's plan measured on compacted copies once, whatever the
    number of re-plans."""
    stand_in_timings(monkeypatch)
    tables, measured = _counting(monkeypatch, "build_table"), _counting(monkeypatch, "within")
    run, model, _ = _run()
    planner = LatencyPlanner(model, 0.6, (16, 1, 6, 6), 1)
    run.planner = planner
    metrics = iter([0.90, 0.80, 0.90, 0.90, 0.50, 0.40])  # the reference, then one verdict per tick
    for tick in range(2, 8):
        if tick > 2:
            _train(model, run)
            run.validated = True
        run.event(tick, tick, lambda: next(metrics))
    undone = [h for h in run.controller.history if not h["accepted"]]
    assert undone and run.recovery.caps  # a verdict undid an event: its families capped, the plan solved again
    assert run.replans >= 4 and planner.final_target is not None
    assert len(tables) == 1  # one table for the whole run
    assert len(measured) == 1  # the last event's plan measured once; the re-plans after it solve on the table
    assert any(s.startswith("re-planned on the table") for s in planner.steps), planner.steps


def test_a_resumed_run_takes_the_table_from_its_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_timings(monkeypatch)
    run, model, _ = _run()
    run.planner = LatencyPlanner(model, 0.6, (16, 1, 6, 6), 1)
    run.event(2, 2, lambda: 0.9)
    state = run.state_dict()
    assert state["latency_table"] is not None
    tables = _counting(monkeypatch, "build_table")
    resumed, copy_of_model, _ = _run()
    copy_of_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(state)
    resumed.planner = LatencyPlanner(copy_of_model, 0.6, (16, 1, 6, 6), 1)  # set when the fit starts
    _train(copy_of_model, resumed)
    resumed.validated = True
    resumed.event(3, 3, lambda: 0.9)
    assert tables == [] and resumed.planner.table == run.planner.table  # type: ignore[union-attr]
