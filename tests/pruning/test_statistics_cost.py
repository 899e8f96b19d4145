"""The cost promises of lightning_compress.pruning.statistics (issue 21): blocks and row blocks change no figure, a
step allocates nothing in proportion to the model, the step checks see what a cheaper check could miss, and the
float32 block moments of the per-unit signals stay accurate when their mean dwarfs their spread."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lightning_compress.pruning.statistics as grad_stats
from lightning_compress.pruning.statistics import GradientStatistics
from tests.pruning.test_statistics import NAMES, SHAPES, _all_stats, _assert_same_stats, _feed, _stream

BIG = [torch.Size((256, 512)), torch.Size((64, 16, 3, 3)), torch.Size((10, 256))]  # several blocks and row blocks
BIG_NAMES = ["fc1", "conv", "fc2"]


@pytest.mark.parametrize("per_weight", [True, False], ids=["per_weight", "per_unit"])
def test_blocks_and_row_blocks_give_bit_identical_statistics(monkeypatch, per_weight: bool) -> None:
    """Rows are independent and Welford is elementwise: cutting the work into (row) blocks changes no bit."""
    grads, weights = _stream(40, BIG)
    kwargs = {"per_weight": per_weight, "per_unit": not per_weight}
    whole = GradientStatistics(BIG_NAMES, BIG, **kwargs)
    _feed(whole, grads, weights)
    monkeypatch.setattr(grad_stats, "BLOCK", 1000)  # fc1 (512 per row): 1 row per block; conv (144): 6 rows
    cut = GradientStatistics(BIG_NAMES, BIG, **kwargs)
    assert len(cut._blocks) > 1 if per_weight else max(len(c) for _, c in cut._unit_plan[0]) > 1
    _feed(cut, grads, weights)
    _assert_same_stats(cut, whole)


@pytest.mark.parametrize("per_weight", [True, False], ids=["per_weight", "per_unit"])
def test_a_step_allocates_nothing_in_proportion_to_the_model(per_weight: bool) -> None:
    """32 steps (one per-unit merge) of a 140k-weight model allocate less than 1 KiB per step: scalars only, no
    temporary the size of a gradient, a block or a unit row (the merge's (2, units) results excepted)."""
    grads, weights = _stream(2, BIG)
    stats = GradientStatistics(BIG_NAMES, BIG, per_weight=per_weight, per_unit=not per_weight)
    _feed(stats, grads * 20, weights * 20)  # warm: every buffer made
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _feed(stats, grads * 16, weights * 16)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    units = sum(s[0] for s in BIG)
    assert allocated / 32 < 1024 + 2 * 2 * 8 * units / 32, allocated


def test_loss_scaled_fp16_gradients_over_several_blocks_are_counted(monkeypatch) -> None:
    """The several-block check takes each gradient's norm in float32: in fp16 a loss-scaled gradient's norm
    overflows (here about 2e5 > 65504) and every step would be refused as non-finite."""
    monkeypatch.setattr(grad_stats, "BLOCK", 16)
    grads, weights = _stream(4, BIG)
    scale = 2.0**12
    half = [[(g * scale).half() for g in step] for step in grads]
    assert all(bool(g.isfinite().all()) for step in half for g in step)
    assert float(torch.linalg.vector_norm(half[0][0].float())) > 65504
    stats = GradientStatistics(BIG_NAMES, BIG, per_weight=True, per_unit=False)
    _feed(stats, half, weights, grad_scale=scale)
    exact = GradientStatistics(BIG_NAMES, BIG, per_weight=True, per_unit=False)
    _feed(exact, [[g.float() / scale for g in step] for step in half], weights)
    for a, b in zip(_all_stats(stats), _all_stats(exact), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("where", [0, 31, 32], ids=["first_sample", "last_of_block", "after_merge"])
@pytest.mark.parametrize("bad", [float("nan"), 1e20], ids=["nan", "huge"])
def test_refused_per_unit_step_leaves_no_sample(where: int, bad: float) -> None:
    """The per-unit signals are written straight into the next stored sample; a refused step is not committed,
    wherever it falls in the block of 32, so the statistics equal those of the clean stream."""
    grads, weights = _stream(40)
    stats = GradientStatistics(NAMES, SHAPES, per_weight=False, per_unit=True)
    clean = GradientStatistics(NAMES, SHAPES, per_weight=False, per_unit=True)
    for t, (g, w) in enumerate(zip(grads, weights)):
        if t == where:
            broken = [x.clone() for x in g]
            broken[0].view(-1)[0] = bad
            assert stats.update(broken, w) is False
        assert stats.update(g, w) is True
        clean.update(g, w)
    assert stats.count == clean.count == 40 and stats.skipped_steps == 1
    _assert_same_stats(stats, clean)


def test_per_unit_moments_accurate_when_the_mean_dwarfs_the_spread() -> None:
    """Units whose Taylor signal is about 1e4 with a spread of about 0.05: the float32 block moments (shifted by
    the block's first sample), merged in float64, match a float64 two-pass reference of the same float32 signals
    (unshifted float32 block moments were 0.3 % off)."""
    torch.manual_seed(0)
    shape = torch.Size((3, 4))
    weights = torch.full(shape, 50.0)
    grads = [[50.0 + 5e-4 * torch.randn(shape)] for _ in range(100)]  # taylor = sum_j 50 * g ~ 1e4
    stats = GradientStatistics(["w"], [shape], per_weight=False, per_unit=True)
    _feed(stats, grads, [[weights]] * 100)
    taylor = torch.stack([(weights * g[0]).sum(1) for g in grads]).double()  # the float32 signals, widened
    torch.testing.assert_close(stats._unit.variance()[1], taylor.var(0, unbiased=False), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(stats.unit_taylor_second_moment()[0], taylor.square().mean(0), rtol=1e-9, atol=0.0)


def test_the_fused_dot_path_used_off_cpu_gives_the_same_signals() -> None:
    """Off CPU (no product buffer) the dot products are one ``vecdot`` per layer; run that path here on CPU,
    with fp32 and bf16 gradients, against the buffered one."""
    grads, weights = _stream(12, BIG)
    for low in (False, True):
        stream = [[g.bfloat16() for g in step] for step in grads] if low else grads
        buffered = GradientStatistics(BIG_NAMES, BIG, per_weight=False, per_unit=True)
        fused = GradientStatistics(BIG_NAMES, BIG, per_weight=False, per_unit=True)
        fused._unit_scratch = None  # what a CUDA device gets
        fused.reset()  # plans the views again, without product buffers
        assert all(product is None for _, chunks in fused._unit_plan[0] for *_, product in chunks)
        _feed(buffered, stream, weights)
        _feed(fused, stream, weights)
        for a, b in zip(_all_stats(fused), _all_stats(buffered), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
