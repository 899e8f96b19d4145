"""Huge but finite gradient steps (issue 13) and checkpointed statistics that cannot be right: skipped, refused or
restarted, never an ``inf`` that stays forever."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.pruning.statistics import GradientStatistics
from tests.pruning.test_statistics import NAMES, SHAPES, _all_stats, _assert_same_stats, _feed, _roundtrip, _stream


@pytest.mark.parametrize("block", [16, 1 << 20], ids=["many_blocks", "one_block"])
@pytest.mark.parametrize("per_unit", [True, False])
@pytest.mark.parametrize("value", [1e20, 3e38, 2e15], ids=["1e20", "near_float32_max", "just_over_the_bound"])
def test_huge_finite_step_is_skipped_and_statistics_stay_finite(monkeypatch, block: int, per_unit: bool,
                                                                value: float) -> None:
    """Before the fix, one finite gradient of 1e20 made M2 += d*d overflow to inf: every later std stayed inf."""
    import lightning_compress.pruning.statistics as grad_stats

    monkeypatch.setattr(grad_stats, "BLOCK", block)
    grads, weights = _stream(20)
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=per_unit)
    clean = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=per_unit)
    for t, (g, w) in enumerate(zip(grads, weights)):
        if t == 6:
            huge = [x.clone() for x in g]
            huge[0].view(-1)[3] = value
            assert torch.isfinite(huge[0]).all()
            assert stats.update(huge, w) is False
        assert stats.update(g, w) is True
        clean.update(g, w)
    assert stats.skipped_steps == 1 and stats.count == 20
    assert all(bool(t.isfinite().all()) for t in _all_stats(stats))
    _assert_same_stats(stats, clean)  # the huge step left no trace


def test_large_but_ordinary_gradients_are_still_counted() -> None:
    """The bound is far above any real gradient: 1e12 (and its loss-scaled form) is counted, exactly."""
    grads, weights = _stream(5)
    big = [[g * 1e12 for g in step] for step in grads]
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    _feed(stats, big, weights)
    scaled = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    _feed(scaled, [[g * 2.0**16 for g in step] for step in big], weights, grad_scale=2.0**16)
    assert stats.skipped_steps == scaled.skipped_steps == 0
    _assert_same_stats(stats, scaled)


def test_loss_scale_is_divided_out_before_the_huge_check() -> None:
    """A gradient of 1e18 carrying a loss scale of 2**16 is 1.5e13 unscaled: an ordinary step."""
    grads, weights = _stream(2)
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    step = [g.clone() for g in grads[0]]
    step[0].view(-1)[0] = 1e18
    assert stats.update(step, weights[0], grad_scale=2.0**16) is True
    assert stats.update(step, weights[0]) is False  # the same numbers without a loss scale: huge


def test_checkpoint_with_non_finite_statistics_restarts_them() -> None:
    grads, weights = _stream(4)
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    _feed(stats, grads, weights)
    state = _roundtrip(stats.state_dict())
    state["weight"]["m2"][0].view(-1)[0] = float("inf")  # as a huge step left it before the fix
    fresh = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    with pytest.warns(RuntimeWarning, match=r"hold NaN/inf .* restart from zero steps \(were 4\)"):
        fresh.load_state_dict(state)
    assert fresh.count == 0
    _feed(fresh, grads, weights)
    assert all(bool(t.isfinite().all()) for t in _all_stats(fresh))


@pytest.mark.parametrize("where", ["weight_mean", "unit_mean", "weight_count"])
def test_checkpoint_statistics_of_another_shape_are_refused(where: str) -> None:
    """``copy_`` would broadcast a (1,)-shaped tensor over a whole layer: refused, naming the layer."""
    grads, weights = _stream(2)
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    _feed(stats, grads, weights)
    state = _roundtrip(stats.state_dict())
    if where == "weight_mean":
        state["weight"]["mean"][1] = torch.zeros(1)
        match = r"per-weight mean statistics of 'conv.weight' are shaped \(1,\), expected \(4, 3, 3, 3\)"
    elif where == "unit_mean":
        state["rms" if "rms" in state else "unit"]["rms"]["mean"] = torch.zeros(1)
        match = r"per-unit rms statistics of 'mean' are shaped \(1,\)"
    else:
        state["weight"]["m2"] = state["weight"]["m2"][:2]
        match = r"holds 2 per-weight m2 tensors, this run tracks 3"
    with pytest.raises(ValueError, match=match):
        GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True).load_state_dict(state)
