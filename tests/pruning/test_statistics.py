"""Tests for lightning_compress.pruning.statistics against simple float64 references."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor

from lightning_compress.pruning.statistics import GradientStatistics

SHAPES = [torch.Size((6, 5)), torch.Size((4, 3, 3, 3)), torch.Size((3,))]  # Linear, Conv2d, 1-D
NAMES = ["fc.weight", "conv.weight", "vec.weight"]
STEPS = 100


def _stream(steps: int = STEPS, shapes=SHAPES) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """Per-step fp32 gradients with a non-zero, per-element mean and spread; weights drift a little per step."""
    means = [2.0 * torch.randn(s) for s in shapes]
    spreads = [0.5 + torch.rand(s) for s in shapes]
    base_w = [torch.randn(s) for s in shapes]
    grads = [[m + sd * torch.randn(s) for m, sd, s in zip(means, spreads, shapes)] for _ in range(steps)]
    weights = [[w + 0.01 * t for w in base_w] for t in range(steps)]
    return grads, weights


def _feed(stats: GradientStatistics, grads, weights, grad_scale: float = 1.0) -> None:
    for g, w in zip(grads, weights):
        assert stats.update(g, w, grad_scale=grad_scale)


def _ref_weight(grads, i: int) -> tuple[Tensor, Tensor]:
    stacked = torch.stack([g[i] for g in grads]).double()
    return stacked.mean(0), stacked.std(0, unbiased=False)


def _ref_unit(grads, weights, i: int) -> tuple[Tensor, Tensor, Tensor]:
    """float64 per-unit RMS mean/std and Taylor second moment E[(sum_j w_ij g_ij)^2]."""
    g = torch.stack([s[i] for s in grads]).double()
    g = g.reshape(g.shape[0], g.shape[1], -1)  # (T, units, fan_in)
    w = torch.stack([s[i] for s in weights]).double().reshape(g.shape)
    rms = g.square().mean(2).sqrt()  # (T, units)
    taylor = (w * g).sum(2)
    return rms.mean(0), rms.std(0, unbiased=False), taylor.square().mean(0)


def test_per_weight_mean_std_match_reference() -> None:
    grads, weights = _stream()
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=False)
    _feed(stats, grads, weights)
    means, stds = stats.weight_mean(), stats.weight_std()
    assert stats.count == STEPS
    for i, shape in enumerate(SHAPES):
        ref_mean, ref_std = _ref_weight(grads, i)
        assert means[i].shape == shape and means[i].dtype == torch.float32
        torch.testing.assert_close(means[i].double(), ref_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stds[i].double(), ref_std, rtol=1e-4, atol=1e-5)


def test_per_weight_std_accurate_for_large_mean_small_std() -> None:
    """mean 1e3, std 1e-1: (mean/std)^2 = 1e8 > 1/eps(fp32), so the raw fp32 `Q - S^2/n` cancels completely.
    The streaming statistics must stay accurate, and far better than that naive formula."""
    shape = torch.Size((64,))
    grads = [[(1e3 + 1e-1 * torch.randn(shape, dtype=torch.float64)).float()] for _ in range(STEPS)]
    weights = [[torch.zeros(shape)] for _ in range(STEPS)]
    stats = GradientStatistics(["w"], [shape], per_weight=True, per_unit=False)
    _feed(stats, grads, weights)
    ref_mean, ref_std = _ref_weight(grads, 0)

    s, q = torch.zeros(shape), torch.zeros(shape)  # naive fp32 sum / sum of squares over all steps
    for (g,) in grads:
        s += g
        q += g * g
    naive_std = (q / STEPS - (s / STEPS) ** 2).clamp_min(0).sqrt().double()
    naive_err = ((naive_std - ref_std).abs() / ref_std).max().item()
    ours_err = ((stats.weight_std()[0].double() - ref_std).abs() / ref_std).max().item()

    assert naive_err > 0.5  # the naive formula is useless here (this is what the test guards against)
    assert ours_err < 1e-3, f"relative std error {ours_err:.3g} (naive: {naive_err:.3g})"
    assert ours_err < naive_err / 100
    torch.testing.assert_close(stats.weight_mean()[0].double(), ref_mean, rtol=1e-6, atol=0.0)


def test_per_unit_rms_and_taylor_match_reference() -> None:
    grads, weights = _stream()
    stats = GradientStatistics(NAMES, SHAPES, per_weight=False, per_unit=True)
    _feed(stats, grads, weights)
    rms_mean, rms_std, taylor = stats.unit_rms_mean(), stats.unit_rms_std(), stats.unit_taylor_second_moment()
    for i, shape in enumerate(SHAPES):
        ref_mean, ref_std, ref_taylor = _ref_unit(grads, weights, i)
        assert rms_mean[i].shape == (shape[0],)
        torch.testing.assert_close(rms_mean[i], ref_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rms_std[i], ref_std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(taylor[i], ref_taylor, rtol=1e-5, atol=1e-6)


def test_conv_weights_per_weight_and_per_unit() -> None:
    shape = torch.Size((8, 3, 3, 3))
    grads, weights = _stream(40, [shape])
    stats = GradientStatistics(["conv.weight"], [shape], per_weight=True, per_unit=True)
    _feed(stats, grads, weights)
    ref_mean, ref_std = _ref_weight(grads, 0)
    assert stats.weight_mean()[0].shape == shape
    torch.testing.assert_close(stats.weight_mean()[0].double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.weight_std()[0].double(), ref_std, rtol=1e-4, atol=1e-5)
    ref_rms_mean, _, ref_taylor = _ref_unit(grads, weights, 0)
    torch.testing.assert_close(stats.unit_rms_mean()[0], ref_rms_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.unit_taylor_second_moment()[0], ref_taylor, rtol=1e-5, atol=1e-6)


def _all_stats(stats: GradientStatistics) -> list[Tensor]:
    out = []
    if stats.per_weight:
        out += stats.weight_mean() + stats.weight_std()
    if stats.per_unit:
        out += stats.unit_rms_mean() + stats.unit_rms_std() + stats.unit_taylor_second_moment()
    return out


def _assert_same_stats(a: GradientStatistics, b: GradientStatistics) -> None:
    """Every statistic of ``a`` bit-identical to ``b``'s."""
    for x, y in zip(_all_stats(a), _all_stats(b), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("per_unit", [True, False], ids=["per_unit_check", "foreach_norm_check"])
def test_non_finite_step_is_skipped(per_unit: bool) -> None:
    grads, weights = _stream(20)
    bad_nan = [g.clone() for g in grads[0]]
    bad_nan[1].view(-1)[7] = float("nan")
    bad_inf = [g.clone() for g in grads[0]]
    bad_inf[2][0] = float("-inf")
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=per_unit)
    clean = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=per_unit)
    for t, (g, w) in enumerate(zip(grads, weights)):
        if t == 5:
            assert stats.update(bad_nan, w) is False
        if t == 9:
            assert stats.update(bad_inf, w) is False
        assert stats.update(g, w) is True
        clean.update(g, w)
    assert stats.count == clean.count == 20
    assert stats.skipped_steps == 2 and clean.skipped_steps == 0
    _assert_same_stats(stats, clean)


def test_grad_scale_is_divided_out() -> None:
    grads, weights = _stream(30)
    plain = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    _feed(plain, grads, weights)
    for scale, exact in ((2.0**12, True), (1000.0, False)):
        scaled = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
        _feed(scaled, [[g * scale for g in step] for step in grads], weights, grad_scale=scale)
        for a, b in zip(_all_stats(scaled), _all_stats(plain), strict=True):
            if exact:  # a power of two scales and unscales without rounding
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _roundtrip(state: dict) -> dict:
    """As a checkpoint does it: serialise and read back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("split", [16, 13], ids=["at_unit_block_boundary", "mid_unit_block"])
@pytest.mark.parametrize("per_weight", [True, False])
def test_resume_equals_uninterrupted(split: int, per_weight: bool) -> None:
    grads, weights = _stream(40)
    kwargs = {"per_weight": per_weight, "per_unit": True}
    uninterrupted = GradientStatistics(NAMES, SHAPES, **kwargs)
    _feed(uninterrupted, grads, weights)

    first = GradientStatistics(NAMES, SHAPES, **kwargs)
    _feed(first, grads[:split], weights[:split])
    first.update([torch.full(s, float("nan")) for s in SHAPES], weights[0])  # a skipped step travels too
    state = _roundtrip(first.state_dict())
    assert len(state["unit"]["pending"]) == split  # per-unit samples not yet merged travel as they are
    resumed = GradientStatistics(NAMES, SHAPES, **kwargs)
    resumed.load_state_dict(state)
    _feed(resumed, grads[split:], weights[split:])

    assert resumed.count == uninterrupted.count == 40
    assert resumed.skipped_steps == 1
    _assert_same_stats(resumed, uninterrupted)


def test_state_dict_is_a_snapshot() -> None:
    """Updates after `state_dict()` must not change the state already handed out (e.g. to an async checkpoint)."""
    grads, weights = _stream(10)
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    _feed(stats, grads[:5], weights[:5])
    state = stats.state_dict()
    frozen = copy.deepcopy(state)
    _feed(stats, grads[5:], weights[5:])
    for key in ("rms", "taylor"):
        for field in ("mean", "m2"):
            assert torch.equal(state["unit"][key][field], frozen["unit"][key][field]), f"unit/{key}/{field}"
    for field in ("mean", "m2"):
        for a, b in zip(state["weight"][field], frozen["weight"][field], strict=True):
            assert torch.equal(a, b), f"weight/{field}"


def test_load_state_dict_refuses_other_layers() -> None:
    stats = GradientStatistics(NAMES, SHAPES, per_weight=False)
    other = GradientStatistics(["a", "b", "c"], SHAPES, per_weight=False)
    with pytest.raises(ValueError, match=r"taken for layers .* but this run tracks"):
        other.load_state_dict(stats.state_dict())


def test_load_state_dict_needs_per_weight_state() -> None:
    unit_only = GradientStatistics(NAMES, SHAPES, per_weight=False)
    both = GradientStatistics(NAMES, SHAPES, per_weight=True)
    with pytest.raises(ValueError, match="holds no per-weight statistics"):
        both.load_state_dict(unit_only.state_dict())


def test_reading_untracked_statistics_raises() -> None:
    unit_only = GradientStatistics(NAMES, SHAPES, per_weight=False, per_unit=True)
    with pytest.raises(RuntimeError, match="per-weight statistics were not tracked"):
        unit_only.weight_mean()
    with pytest.raises(RuntimeError, match="per-weight statistics were not tracked"):
        unit_only.weight_std()
    weight_only = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=False)
    for read in (weight_only.unit_rms_mean, weight_only.unit_rms_std, weight_only.unit_taylor_second_moment):
        with pytest.raises(RuntimeError, match="per-unit statistics were not tracked"):
            read()


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="track at least one"):
        GradientStatistics(NAMES, SHAPES, per_weight=False, per_unit=False)


def test_std_is_zero_before_two_steps() -> None:
    stats = GradientStatistics(["w"], [(3, 2)], per_weight=True, per_unit=True)
    assert all(torch.equal(s, torch.zeros(3, 2)) for s in stats.weight_std())
    stats.update([torch.ones(3, 2)], [torch.ones(3, 2)])
    assert torch.equal(stats.weight_std()[0], torch.zeros(3, 2))
    assert torch.equal(stats.weight_mean()[0], torch.ones(3, 2))
    assert torch.equal(stats.unit_rms_std()[0], torch.zeros(3, dtype=torch.float64))


def test_blocks_cover_every_element_once() -> None:
    from lightning_compress.pruning.moments import blocks as _blocks

    sizes = [10, 600, 5, 3, 1000]
    for limit in (None, 16, 256, 1 << 20):
        blocks = _blocks(sizes, limit)
        covered = []
        for start, end, parts in blocks:
            assert limit is None or end - start <= limit
            assert end - start == sum(hi - lo for _, lo, hi in parts)
            covered += [(i, k) for i, lo, hi in parts for k in range(lo, hi)]
        assert covered == [(i, k) for i, n in enumerate(sizes) for k in range(n)]
        assert [b[0] for b in blocks[1:]] == [b[1] for b in blocks[:-1]]  # contiguous


@pytest.mark.parametrize("block", [16, 1 << 20], ids=["many_blocks", "one_block"])
def test_blocking_gives_the_same_statistics_and_skips_bad_steps(monkeypatch, block: int) -> None:
    import lightning_compress.pruning.statistics as grad_stats

    grads, weights = _stream(12)
    reference = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=False)
    _feed(reference, grads, weights)
    monkeypatch.setattr(grad_stats, "BLOCK", block)
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=False)
    assert (len(stats._blocks) > 1) == (block == 16)
    for t, (g, w) in enumerate(zip(grads, weights)):
        if t in (0, 7):  # a NaN in the last tensor: the last block when there are several
            bad = [x.clone() for x in g]
            bad[-1][-1] = float("nan")
            assert stats.update(bad, w) is False
        assert stats.update(g, w) is True
    assert stats.skipped_steps == 2
    _assert_same_stats(stats, reference)


def test_reset_forgets_every_step() -> None:
    grads, weights = _stream(10)
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    fresh = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    _feed(stats, grads[:6], weights[:6])
    stats.reset()
    assert stats.count == 0
    _feed(stats, grads[6:], weights[6:])
    _feed(fresh, grads[6:], weights[6:])
    _assert_same_stats(stats, fresh)


def test_bf16_gradients_are_accumulated_in_float32() -> None:
    grads, weights = _stream(8)
    low = [[g.bfloat16() for g in step] for step in grads]
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    _feed(stats, low, weights)
    exact = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=True)
    _feed(exact, [[g.float() for g in step] for step in low], weights)
    for a, b in zip(_all_stats(stats), _all_stats(exact), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_per_weight_state_is_two_float32_values_per_tracked_weight() -> None:
    """The memory promise of the per-weight mode: a running mean and M2, nothing per weight beyond that."""
    grads, weights = _stream(3)
    stats = GradientStatistics(NAMES, SHAPES, per_weight=True, per_unit=False)
    _feed(stats, grads, weights)
    tracked = sum(s.numel() for s in SHAPES)
    per_weight = stats.state_dict()["weight"]
    saved = sum(t.numel() * t.element_size() for key in ("mean", "m2") for t in per_weight[key])
    assert saved == 2 * 4 * tracked
    assert sum(b.numel() * b.element_size() for b in stats._flat.values()) == 2 * 4 * tracked

