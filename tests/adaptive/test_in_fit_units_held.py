"""What the deferred gate of a latency budget holds (adaptive/recovery_gate.py, review finding 8): it is kept in
memory and in every checkpoint until a verdict, so it must not grow with a copy of every parameter's mask per
event. Nothing is held when no verdict can refuse an event (no bound, or no metric to judge by); with a bound, each
held event keeps its unit masks, the values it zeroed and its units' statistics, and undoing it still restores the
model exactly (the undo tests of test_in_fit_units_gate.py run on the same snapshots). Driven without a Trainer,
as in test_in_fit_units_gate.py."""

from __future__ import annotations

import pytest

from lightning_compress.core.gate import MetricGate
from lightning_compress.pruning.schedule import PruningSchedule
from tests.adaptive.test_in_fit_units_gate import _run, _train

TICKS = range(2, 7)  # the schedule's events, one per tick; no validation in between judges them


def _events(bound: float | None, metric: float | None) -> tuple[list[int], list[str]]:
    """Events at every tick of :data:`TICKS` with ``bound`` and the metric ``metric`` (None: no validation); the
    number of events held after each, and the notes."""
    run, model, _ = _run()
    run.controller.gate = MetricGate(bound)
    run.schedule = PruningSchedule("polynomial", 1.0, min(TICKS), max(TICKS), 1)
    held, notes = [], []
    for tick in TICKS:
        entry = run.event(tick, tick, lambda: metric)
        notes.append("" if entry is None else entry["note"])
        held.append(len(run.recovery.held))
        _train(model, run)
    assert any(notes)  # some event pruned
    return held, notes


@pytest.mark.parametrize("bound, metric", [(None, 0.9), (0.02, None)], ids=["no bound", "no validation"])
def test_nothing_is_held_when_no_verdict_can_refuse_an_event(bound: float | None, metric: float | None) -> None:
    held, notes = _events(bound, metric)
    assert held == [0] * len(held)
    assert all("nothing is held" in note for note in notes if note)


def test_a_held_event_keeps_unit_masks_not_every_parameter_mask() -> None:
    run, model, _ = _run()
    run.schedule = PruningSchedule("polynomial", 1.0, min(TICKS), max(TICKS), 1)
    for tick in TICKS:  # never validated: every event stays held until the end of the fit
        run.event(tick, tick, lambda: 0.9)
        _train(model, run)
    held = run.recovery.held
    assert len(held) >= 2 and all(h.masks is None for h in held)  # the parameter masks follow from the unit masks
    # every weight is zeroed by one event at most: what all held events keep stays within the model's size (plus
    # a few bits per unit per event), where a mask of every parameter per event grew with the events
    kept = sum(t.numel() for h in held for part in (h.unit_masks, h.values, h.buffers) for t in part.values())
    parameters = sum(p.numel() for p in model.parameters())
    units = sum(g.num_units for g in run.state.groups.values() if g.prunable)
    assert kept <= parameters + len(held) * units, (kept, parameters)
    state = run.state_dict()["recovery"]["held"]
    assert all(h["masks"] is None for h in state)  # and so in the checkpoint
