"""Tests for lightning_compress.pruning.schedule.PruningSchedule."""

from __future__ import annotations

import dataclasses

import pytest

from lightning_compress.pruning.schedule import SCHEDULES, PruningSchedule


def _zhu_gupta(t: int, s_i: float, s_f: float, t0: int, t_end: int) -> float:
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3


# ---------------------------------------------------------------------------- one_shot
def test_one_shot() -> None:
    schedule = PruningSchedule(kind="one_shot", sparsity=0.7, start=5)
    assert [t for t in range(30) if schedule.is_event(t)] == [5]
    assert schedule.target(5) == 0.7
    assert schedule.target(4) is None and schedule.target(6) is None and schedule.target(10) is None
    assert schedule.last_tick() == 5


# ---------------------------------------------------------------------------- constant
def test_constant_targets_and_cap() -> None:
    schedule = PruningSchedule(kind="constant", sparsity=0.5, start=2, frequency=3, amount=0.2)
    events = [t for t in range(20) if schedule.is_event(t)]
    assert events == [2, 5, 8, 11, 14, 17]
    assert schedule.target(2) == pytest.approx(0.2)
    assert schedule.target(5) == pytest.approx(1 - 0.8**2)  # 0.36
    assert schedule.target(8) == pytest.approx(1 - 0.8**3)  # 0.488
    assert schedule.target(11) == 0.5  # 1 - 0.8**4 = 0.5904, capped at `sparsity`
    assert schedule.target(1000 * 3 + 2) == 0.5
    assert schedule.target(3) is None and schedule.target(1) is None
    assert schedule.last_tick() is None


def test_constant_with_end() -> None:
    schedule = PruningSchedule(kind="constant", sparsity=0.9, start=1, end=9, frequency=4, amount=0.5)
    assert [t for t in range(20) if schedule.is_event(t)] == [1, 5, 9]
    assert [schedule.target(t) for t in (1, 5, 9)] == pytest.approx([0.5, 0.75, 0.875])
    assert schedule.target(13) is None
    assert schedule.last_tick() == 9


# ---------------------------------------------------------------------------- polynomial
@pytest.mark.parametrize("s_i", [0.0, 0.2])
def test_polynomial_follows_zhu_gupta(s_i: float) -> None:
    schedule = PruningSchedule(kind="polynomial", sparsity=0.8, start=10, end=50, frequency=10, initial_sparsity=s_i)
    assert [t for t in range(100) if schedule.is_event(t)] == [10, 20, 30, 40, 50]
    assert schedule.target(10) == pytest.approx(s_i)
    assert schedule.target(20) == pytest.approx(_zhu_gupta(20, s_i, 0.8, 10, 50))
    assert schedule.target(30) == pytest.approx(0.8 + (s_i - 0.8) * 0.125)
    assert schedule.target(40) == pytest.approx(0.8 + (s_i - 0.8) / 64)
    assert schedule.target(50) == pytest.approx(0.8)
    assert schedule.target(15) is None and schedule.target(60) is None and schedule.target(9) is None
    assert schedule.last_tick() == 50
    targets = [schedule.target(t) for t in (10, 20, 30, 40, 50)]
    steps = [b - a for a, b in zip(targets, targets[1:])]
    assert all(x > y > 0 for x, y in zip(steps, steps[1:]))  # fast early, gentle late


def test_polynomial_end_is_an_event_off_the_grid() -> None:
    schedule = PruningSchedule(kind="polynomial", sparsity=0.6, start=1, end=10, frequency=4)
    assert [t for t in range(20) if schedule.is_event(t)] == [1, 5, 9, 10]
    assert schedule.target(9) == pytest.approx(_zhu_gupta(9, 0.0, 0.6, 1, 10))
    assert schedule.target(10) == pytest.approx(0.6)


def test_schedule_is_frozen_and_defaults() -> None:
    schedule = PruningSchedule(end=3)
    assert schedule.kind == "polynomial" and SCHEDULES == ("one_shot", "constant", "polynomial")
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.sparsity = 0.1  # type: ignore[misc]


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="cubic"), r"`schedule` must be one of \['one_shot', 'constant', 'polynomial'\], got 'cubic'"),
        (dict(kind="polynomial", end=None), "`end_step` is required by schedule='polynomial'"),
        (dict(kind="polynomial", end=10, sparsity=0.5, initial_sparsity=0.6),
         r"`initial_sparsity` \(0.6\) must not exceed `sparsity` \(0.5\)"),
        (dict(kind="polynomial", end=10, initial_sparsity=-0.1),
         r"`initial_sparsity` must be a number in \[0, 1\), got -0.1"),
        (dict(kind="constant", start=5, end=4), r"`end_step` \(4\) must not be before `start_step` \(5\)"),
        (dict(kind="one_shot", start=5, end=4), r"`end_step` \(4\) must not be before `start_step` \(5\)"),
        (
            dict(kind="polynomial", start=5, end=5),
            "`end_step` must be after `start_step` for a polynomial ramp, both are 5",
        ),
        (dict(kind="constant", frequency=0), r"`frequency` must be an integer in \[1, inf\], got 0"),
        (dict(kind="polynomial", end=10, frequency=-2), r"`frequency` must be an integer in \[1, inf\], got -2"),
        (dict(kind="constant", amount=0.0), r"`amount` must be a number in \(0, 1\), got 0.0"),
        (dict(kind="constant", amount=1.0), r"`amount` must be a number in \(0, 1\), got 1.0"),
        (dict(kind="one_shot", start=0), r"`start_step` must be an integer in \[1, inf\], got 0"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruningSchedule(**kwargs)


def test_valid_edge_cases_are_accepted() -> None:
    PruningSchedule(kind="constant", start=3, end=3)  # a single event
    PruningSchedule(kind="one_shot", start=1)  # ticks count from 1: the first optimizer step / epoch end
    PruningSchedule(kind="polynomial", end=2, sparsity=0.5, initial_sparsity=0.5)


def test_a_polynomial_ramp_may_start_at_zero_and_fires_from_the_first_tick() -> None:
    schedule = PruningSchedule(kind="polynomial", sparsity=0.5, start=0, end=5, frequency=1)
    assert [t for t in range(1, 8) if schedule.is_event(t)] == [1, 2, 3, 4, 5]
    assert schedule.target(5) == pytest.approx(0.5) and 0 < schedule.target(1) < schedule.target(2)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (PruningSchedule("polynomial", 0.8, start=2, end=12, frequency=3), {1: None, 2: 0.0, 4: 0.0, 6: 0.5256, 12: 0.8,
                                                                          15: 0.8}),
        (PruningSchedule("constant", 0.8, start=2, frequency=3, amount=0.5), {1: None, 3: 0.5, 6: 0.75, 30: 0.8}),
        (PruningSchedule("one_shot", 0.6, start=4), {3: None, 4: 0.6, 9: 0.6}),
    ],
)
def test_target_by_is_the_target_of_the_last_event_at_or_before_the_tick(schedule, expected) -> None:
    """A retried step aims at the target in force between events and after the last one."""
    for tick, target in expected.items():
        assert schedule.target_by(tick) == (None if target is None else pytest.approx(target, abs=1e-4)), tick
