"""The pruning run's decisions without a Trainer: events due, targets, accept / roll back / back off, state."""

from __future__ import annotations

import pytest

from lightning_compress.core.gate import MetricGate
from lightning_compress.pruning.controller import PruningController
from lightning_compress.pruning.schedule import PruningSchedule


def _controller(bound: float | None = 0.02, reference: str = "previous", on_violation: str = "backoff",
                patience: int | None = None):
    return PruningController(MetricGate(bound), reference, on_violation, patience)


def _conclude(controller: PruningController, before: float, after: float, tried: float, current: float = 0.0,
              tick: int = 1):
    return controller.conclude(tick=tick, step=tick, metric_before=before, metric_after=after, weights_finite=True,
                               sparsity_before=current, sparsity_tried=tried)


def test_each_event_is_judged_against_the_metric_just_before_it() -> None:
    controller = _controller()
    assert _conclude(controller, 0.90, 0.89, 0.3).accepted
    # the model recovered and improved to 0.96: a step to 0.93 costs 3 points, over the 2-point bound,
    # although 0.93 is above the first measurement minus the bound (the defect of a fixed early baseline)
    decision = _conclude(controller, 0.96, 0.93, 0.5, current=0.3)
    assert not decision.accepted and decision.reference == 0.96 and decision.drop == pytest.approx(0.03)


def test_initial_reference_is_a_fixed_budget() -> None:
    controller = _controller(reference="initial")
    assert _conclude(controller, 0.90, 0.89, 0.3).accepted
    decision = _conclude(controller, 0.96, 0.885, 0.5, current=0.3)
    assert decision.accepted and decision.reference == 0.90 and decision.drop == pytest.approx(0.015)
    assert not _conclude(controller, 0.96, 0.87, 0.6, current=0.5).accepted


def test_a_refused_step_backs_off_halfway_and_halves_again_without_stopping() -> None:
    controller = _controller()
    decision = _conclude(controller, 0.9, 0.5, tried=0.8, current=0.4)
    assert not decision.accepted and controller.sparsity_cap == pytest.approx(0.6)
    assert "capped at 0.600" in decision.note and "next validation" in decision.note
    schedule = PruningSchedule("constant", sparsity=0.9, start=1, frequency=1, amount=0.9)
    assert controller.target(5, schedule) == pytest.approx(0.6)
    _conclude(controller, 0.9, 0.5, tried=0.6, current=0.4)
    _conclude(controller, 0.9, 0.5, tried=0.5, current=0.4)
    assert controller.sparsity_cap == pytest.approx(0.45) and not controller.stopped
    assert not controller.finished(schedule) and controller.rollbacks() == 3


@pytest.mark.parametrize(("patience", "due_at"), [(None, []), (3, [5, 6, 7])])
def test_a_retry_is_due_after_patience_or_at_the_next_validation(patience, due_at) -> None:
    controller = _controller(patience=patience)
    _conclude(controller, 0.9, 0.5, tried=0.8, tick=2)
    assert [t for t in range(3, 8) if controller.retry_due(t)] == due_at
    assert controller.retry_due(3, validated=True)
    schedule = PruningSchedule("one_shot", sparsity=0.8, start=2)  # its only event was at 2: the retry is extra
    assert controller.due(4, schedule, validated=True) and not controller.due(4, schedule, validated=True)
    assert not controller.finished(schedule)  # the statistics keep counting for the retry


@pytest.mark.parametrize(
    ("metric_now", "lifted"),
    [
        (0.95, True),  # trained on past the metric before the refusal
        (0.89, True),  # within the 2-point bound of the refused step's reference (0.90)
        (0.85, False),  # not recovered: worse than that reference by more than the bound
        (None, False),  # nothing measured: nothing to judge recovery by
    ],
)
def test_a_retry_lifts_the_cap_only_when_the_model_has_recovered(metric_now, lifted: bool) -> None:
    controller = _controller()
    _conclude(controller, 0.9, 0.5, tried=0.8, current=0.4)  # refused at the schedule's target: cap 0.6
    schedule = PruningSchedule("one_shot", sparsity=0.8, start=1)
    assert not controller.recover(0.99), "the retry of a step refused at the target tries the cap first"
    _conclude(controller, 0.9, 0.5, tried=0.6, current=0.4)  # the capped retry refused too: cap 0.5
    assert controller.recover(metric_now) is lifted
    assert controller.target(9, schedule) == pytest.approx(0.8 if lifted else 0.5)


def test_an_accepted_retry_clears_it_but_an_accepted_capped_step_keeps_the_retry() -> None:
    controller = _controller(patience=2)
    _conclude(controller, 0.9, 0.5, tried=0.8, current=0.4, tick=1)
    assert _conclude(controller, 0.9, 0.9, tried=0.6, current=0.4, tick=3).accepted  # at the cap
    assert controller.retry_at == 5 and controller.sparsity_cap == pytest.approx(0.6)
    assert controller.recover(0.95)
    assert _conclude(controller, 0.95, 0.94, tried=0.8, current=0.6, tick=5).accepted
    assert controller.retry_at is None and controller.refused is None and controller.sparsity_cap is None


def test_shortfall_names_the_refused_events() -> None:
    controller = _controller()
    _conclude(controller, 0.9, 0.5, tried=0.4, tick=2)
    short = controller.shortfall(0.4, 0.05)
    assert short is not None and "target sparsity 0.40, delivered 0.05" in short
    assert "step 2 (to 0.400): the metric dropped by 0.4" in short
    assert controller.shortfall(0.4, 0.398) is None and controller.shortfall(None, 0.0) is None


def test_stop_on_violation_stops_at_once() -> None:
    controller = _controller(on_violation="stop")
    assert _conclude(controller, 0.9, 0.5, 0.5).note == "pruning stopped" and controller.stopped


def test_an_accepted_step_resets_the_backoff_count() -> None:
    controller = _controller()
    _conclude(controller, 0.9, 0.5, 0.8, current=0.4)
    assert controller.backoffs == 1
    _conclude(controller, 0.9, 0.895, 0.5, current=0.4)
    assert controller.backoffs == 0 and controller.largest_accepted_drop() == pytest.approx(0.005)


def test_non_finite_weights_are_refused_even_without_a_bound() -> None:
    controller = _controller(bound=None)
    decision = controller.conclude(tick=1, step=1, metric_before=0.9, metric_after=0.9, weights_finite=False,
                                   sparsity_before=0.0, sparsity_tried=0.5)
    assert not decision.accepted and controller.history[-1]["sparsity"] == 0.0


def test_due_marks_each_tick_once_and_only_events() -> None:
    controller = _controller()
    schedule = PruningSchedule("polynomial", sparsity=0.8, start=2, end=6, frequency=2)
    assert [t for t in range(1, 9) if controller.due(t, schedule)] == [2, 4, 6]
    assert not controller.due(6, schedule)  # handled already
    assert controller.finished(schedule)


def test_state_round_trips_and_reads_old_checkpoints() -> None:
    controller = _controller()
    _conclude(controller, 0.9, 0.5, 0.8, current=0.4)
    restored = _controller()
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()
    old = _controller()
    old.load_state_dict({"baseline_metric": 0.7, "history": [], "stopped": True})  # the flat keys of 0.1
    assert old.initial_metric == 0.7 and old.stopped


def test_a_deferred_event_is_due_at_the_next_validation_and_keeps_the_run_unfinished() -> None:
    controller = _controller()
    schedule = PruningSchedule("polynomial", sparsity=0.8, start=2, end=6, frequency=2)
    assert controller.due(6, schedule)
    controller.deferred = True  # align_events: the callback waits for the epoch's validation
    assert not controller.finished(schedule), "the statistics must keep counting until the deferred event"
    assert controller.due(7, schedule, validated=True) and not controller.deferred and controller.finished(schedule)
    restored = _controller()
    controller.deferred = True
    restored.load_state_dict(controller.state_dict())
    assert restored.deferred
