"""GradientStatistics(weight_every=k): the per-weight statistics of every k-th counted step, against float64
references; resume, skipped steps and old checkpoints."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.pruning.statistics import GradientStatistics
from tests.pruning.test_statistics import (
    NAMES,
    SHAPES,
    _all_stats,
    _assert_same_stats,
    _feed,
    _ref_weight,
    _roundtrip,
    _stream,
)


def _make(every: int, per_unit: bool = False) -> GradientStatistics:
    return GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=per_unit, weight_every=every)


@pytest.mark.parametrize("every", [1, 2, 3, 5])
def test_per_weight_statistics_are_those_of_every_kth_step(every: int) -> None:
    grads, weights = _stream(50)
    stats = _make(every)
    _feed(stats, grads, weights)
    sampled = grads[::every]  # steps 0, k, 2k, ...
    assert stats.count == 50 and stats.weight_count == len(sampled)
    for i in range(len(SHAPES)):
        ref_mean, ref_std = _ref_weight(sampled, i)
        torch.testing.assert_close(stats.weight_mean()[i].double(), ref_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.weight_std()[i].double(), ref_std, rtol=1e-4, atol=1e-5)


def test_thousands_of_sampled_steps_stay_accurate_when_the_mean_dwarfs_the_spread() -> None:
    """4,000 steps, every 2nd sampled, mean 1e3 and std 1e-1: relative error of the std below 1e-3, of the mean 1e-6
    (the float32 Welford update is shifted by the running mean: nothing cancels)."""
    shape = torch.Size((32,))
    generator = torch.Generator().manual_seed(0)
    grads = [[(1e3 + 1e-1 * torch.randn(shape, dtype=torch.float64, generator=generator)).float()]
             for _ in range(4000)]
    stats = GradientStatistics(["w"], [shape], per_weight=True, per_unit=False, weight_every=2)
    zero = [torch.zeros(shape)]
    for g in grads:
        stats.update(g, zero)
    ref_mean, ref_std = _ref_weight(grads[::2], 0)
    assert stats.weight_count == 2000
    std_err = ((stats.weight_std()[0].double() - ref_std).abs() / ref_std).max().item()
    assert std_err < 1e-3, f"relative std error {std_err:.3g}"
    torch.testing.assert_close(stats.weight_mean()[0].double(), ref_mean, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-2, ValueError), (1.5, TypeError), (2.0, TypeError), (True, TypeError), ("2", TypeError),
     (None, TypeError)],
)
def test_weight_every_is_validated(value: object, error: type) -> None:
    with pytest.raises(error, match=f"`weight_every` must be an integer.*got {value!r}"):
        GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=False, weight_every=value)  # type: ignore[arg-type]


def test_a_skipped_sampled_step_hands_its_turn_to_the_next_step() -> None:
    """The phase follows the counted steps: a sampled step refused as NaN is not counted, so the next one is sampled
    and the per-weight statistics hold as many samples as without the bad step."""
    grads, weights = _stream(12)
    stats, clean = _make(3, per_unit=True), _make(3, per_unit=True)
    nan = [torch.full(s, float("nan")) for s in SHAPES]
    for t, (g, w) in enumerate(zip(grads, weights)):
        if t == 6:  # a sampled turn (6 counted steps so far)
            assert stats.update(nan, w) is False
        assert stats.update(g, w) is True
        clean.update(g, w)
    assert stats.skipped_steps == 1 and stats.weight_count == clean.weight_count == 4
    _assert_same_stats(stats, clean)


def test_without_per_unit_statistics_an_unsampled_step_is_counted_unread() -> None:
    """per_weight only: the steps between samples are not read at all (that is the saving), so a NaN there is
    counted and changes nothing; per-unit statistics, when tracked, still read and check every step."""
    grads, weights = _stream(4)
    stats = _make(2)
    nan = [torch.full(s, float("nan")) for s in SHAPES]
    for t, (g, w) in enumerate(zip(grads, weights)):
        assert stats.update(nan if t % 2 else g, w) is True
    assert stats.skipped_steps == 0 and stats.count == 4 and stats.weight_count == 2
    assert all(bool(t.isfinite().all()) for t in _all_stats(stats))
    with_units = _make(2, per_unit=True)
    with_units.update(grads[0], weights[0])
    assert with_units.update(nan, weights[1]) is False and with_units.skipped_steps == 1


@pytest.mark.parametrize("split", [7, 8, 13])
def test_resume_equals_uninterrupted(split: int) -> None:
    grads, weights = _stream(30)
    uninterrupted = _make(3, per_unit=True)
    _feed(uninterrupted, grads, weights)
    first = _make(3, per_unit=True)
    _feed(first, grads[:split], weights[:split])
    resumed = _make(3, per_unit=True)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    _feed(resumed, grads[split:], weights[split:])
    assert resumed.count == 30 and resumed.weight_count == uninterrupted.weight_count == 10
    _assert_same_stats(resumed, uninterrupted)


def test_checkpoint_without_a_sample_count_took_every_step() -> None:
    """Checkpoints written before sampling hold no per-weight count: every counted step was a sample."""
    grads, weights = _stream(9)
    old = _make(1)
    _feed(old, grads, weights)
    state = old.state_dict()
    del state["weight"]["count"]
    resumed = _make(1)
    resumed.load_state_dict(state)
    assert resumed.weight_count == 9
    _assert_same_stats(resumed, old)


def test_reset_forgets_the_samples_and_restarts_the_phase() -> None:
    grads, weights = _stream(5)
    stats = _make(2)
    _feed(stats, grads, weights)
    stats.reset()
    assert stats.count == stats.weight_count == 0
    stats.update(grads[0], weights[0])  # the first step after a reset is sampled
    assert stats.weight_count == 1
    torch.testing.assert_close(stats.weight_mean()[0], grads[0][0])
