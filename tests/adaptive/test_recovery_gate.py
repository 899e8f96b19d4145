"""The deferred gate of whole-unit pruning (adaptive/recovery_gate.py) without a Trainer: an event held, the model
"trained" since, then kept or undone: the pruned units' weights and BatchNorm statistics back bit for bit, what
trained elsewhere left as it is, the masks as before, the family capped; the held event through a checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.adaptive.recovery_gate import RecoveryGate
from lightning_compress.core.gate import MetricGate
from lightning_compress.pruning.planner import expand_masks
from lightning_compress.pruning.state import MaskState
from lightning_compress.pruning.tracked import TrackedLayers
from lightning_compress.structure.dependency import find_unit_groups

FAMILIES = {"0": ["0"]}  # the first conv's output channels (BatchNorm "1" follows, conv "3" consumes them)


def _state() -> MaskState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3))
    model.train()
    model(torch.randn(8, 1, 6, 6))  # BatchNorm running statistics away from their defaults
    state = MaskState(model, TrackedLayers({"0": model[0], "3": model[3]}), structured=True)
    state.groups = find_unit_groups(model, torch.randn(2, 1, 6, 6))
    return state


def _prune(state: MaskState, gate: RecoveryGate, keep: list[bool], reference: float = 0.9) -> None:
    """One held event keeping the units ``keep`` of family "0", then a "training step" on every weight."""
    units = {"0": torch.tensor(keep)}
    undo = state.try_masks(expand_masks(state.model, units, state.groups), units)
    gate.hold(state, undo, FAMILIES, {"0": 6}, {"0": sum(keep)}, tick=10, step=10, reference=reference)
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(0.5)
        state.model[1].running_mean.mul_(0.0)  # the removed channels' statistics drift while they are zero
        state.apply()


KEEP = [True, False, True, False, True, True]


def test_an_event_within_the_bound_after_recovery_is_kept() -> None:
    state, gate = _state(), RecoveryGate()
    _prune(state, gate, KEEP)
    masks = {n: m.clone() for n, m in state.masks.items()}
    verdict, held = gate.settle(state, MetricGate(0.02), 0.89, FAMILIES)  # type: ignore[misc]
    assert verdict.accepted and [h.step for h in held] == [10] and gate.held == [] and gate.caps == {}
    assert all(torch.equal(masks[n], state.masks[n]) for n in masks)
    assert "kept" in gate.log[-1] and "steps [10]" in gate.log[-1]


def test_an_event_outside_the_bound_after_recovery_is_undone_and_its_family_capped() -> None:
    state, gate = _state(), RecoveryGate()
    model = state.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _prune(state, gate, KEEP)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    verdict, _ = gate.settle(state, MetricGate(0.02), 0.80, FAMILIES)  # type: ignore[misc]
    assert not verdict.accepted and gate.caps == {"0": 5}  # halfway back from 4 to the 6 it kept before
    gone = torch.tensor([not k for k in KEEP])
    now = model.state_dict()
    # the pruned units: their weights, biases, BatchNorm parameters and statistics as they were at the event
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(now[key][gone], before[key][gone]), key
        assert torch.equal(now[key][~gone], trained[key][~gone]), key  # the kept units keep their training
    assert torch.equal(now["3.weight"][:, gone], before["3.weight"][:, gone])  # the consumer's columns
    assert torch.equal(now["3.weight"][:, ~gone], trained["3.weight"][:, ~gone])
    assert state.masks == {} and state.unit_masks == {}  # nothing was pruned before the event
    state.apply()  # the masks in force no longer zero the restored units
    assert torch.equal(model.state_dict()["0.weight"][gone], before["0.weight"][gone])
    assert "undone" in gate.log[-1] and "0 at 5 units" in gate.log[-1]


def test_a_held_event_survives_a_checkpoint_and_is_undone_the_same() -> None:
    straight, gate = _state(), RecoveryGate()
    _prune(straight, gate, KEEP)
    resumed, again = _state(), RecoveryGate()
    _prune(resumed, RecoveryGate(), KEEP)  # the same weights and masks, as a resumed fit reloads them
    again.load_state_dict(gate.state_dict())
    for state, g in ((straight, gate), (resumed, again)):
        g.settle(state, MetricGate(0.02), 0.5, FAMILIES)
    assert again.caps == gate.caps
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_a_snapshot_that_does_not_fit_the_masks_is_refused() -> None:
    state, gate = _state(), RecoveryGate()
    _prune(state, gate, KEEP)
    held = gate.state_dict()["held"]
    held[0]["values"]["0.weight"] = held[0]["values"]["0.weight"][:3]  # another model's snapshot
    gate.load_state_dict({"held": held})
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        gate.settle(state, MetricGate(0.02), 0.5, FAMILIES)


def test_of_events_held_together_the_newest_is_undone_and_the_older_stay_held() -> None:
    state, gate = _state(), RecoveryGate()
    model = state.model
    _prune(state, gate, KEEP)  # 4 of 6 kept
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    masks_first = {n: m.clone() for n, m in state.masks.items()}
    units = {"0": torch.tensor([True, False, False, False, True, False])}  # then 2 of 6
    undo = state.try_masks(expand_masks(model, units, state.groups), units)
    gate.hold(state, undo, FAMILIES, {"0": 4}, {"0": 2}, tick=20, step=20, reference=0.9)
    verdict, settled = gate.settle(state, MetricGate(0.02), 0.5, FAMILIES)  # type: ignore[misc]
    assert not verdict.accepted and [h.step for h in settled] == [20] and [h.step for h in gate.held] == [10]
    assert gate.caps == {"0": 3}  # halfway from 2 back to the 4 it kept before the newest
    assert all(torch.equal(masks_first[n], state.masks[n]) for n in masks_first)  # as after the first event
    for key, value in model.state_dict().items():
        assert torch.equal(value, after_first[key]), key  # the newest's units restored, the first's still pruned
    assert "the newest (step 20) undone" in gate.log[-1] and "[10] still held" in gate.log[-1]


def test_without_a_metric_the_held_event_is_kept() -> None:
    state, gate = _state(), RecoveryGate()
    _prune(state, gate, KEEP)
    settled = gate.settle(state, MetricGate(0.02), None, FAMILIES)
    assert settled is not None and settled[0].accepted and gate.caps == {}
    assert gate.settle(state, MetricGate(0.02), 0.1, FAMILIES) is None  # nothing held any more
