"""Quantization math against hand-computed references and the analytic error bounds."""

import math

import pytest
import torch

from lightning_compress.quantization.primitives import (
    QuantSpec,
    calibrate,
    choose_qparams,
    dequantize,
    grouped_view,
    int_range,
    quantize,
    quantize_tensor,
    sqnr_db,
)


def _scheme_error(weight, spec):
    """(|w - w_hat|, scale, lowest and highest reconstructable value; all per element) for ``weight``."""
    qt = quantize_tensor(weight, spec)
    groups = grouped_view(weight, spec.granularity, spec.group_size)
    scale = qt.scale.float().unsqueeze(-1).expand_as(groups)
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    zero = 0.0 if qt.zero_point is None else qt.zero_point.float().unsqueeze(-1)
    low, high = (qmin - zero) * scale, (qmax - zero) * scale
    err = (qt.dequantize() - weight).abs()
    return err, scale.reshape(weight.shape), low.reshape(weight.shape), high.reshape(weight.shape), qt


def test_symmetric_4bit_hand_example():
    w = torch.tensor([[-0.5, 0.0, 0.25, 1.0, -0.9]])
    qt = quantize_tensor(w, QuantSpec(bits=4, granularity="per_tensor"))
    scale = 1.0 / 7.5  # amax / ((qmax - qmin) / 2) = 1 / (15 / 2)
    assert qt.scale.item() == pytest.approx(scale, rel=1e-7)
    # w / s = [-3.75, 0, 1.875, 7.5, -6.75] -> round -> [-4, 0, 2, 7 or 8, -7] -> clamp(-8, 7)
    assert qt.q.tolist() == [[-4, 0, 2, 7, -7]]
    assert qt.dequantize()[0].tolist() == pytest.approx([-4 * scale, 0.0, 2 * scale, 7 * scale, -7 * scale])


def test_asymmetric_2bit_hand_example():
    w = torch.tensor([[-0.3, 0.0, 0.6, 0.9]])
    qt = quantize_tensor(w, QuantSpec(bits=2, granularity="per_channel", symmetric=False))
    # range [-0.3, 0.9] over codes 0..3: s = 1.2 / 3 = 0.4; z = round(0 - (-0.3) / 0.4) = round(0.75) = 1
    assert qt.scale.item() == pytest.approx(0.4)
    assert qt.zero_point.item() == 1
    # round([-0.75, 0, 1.5, 2.25]) + 1 = [-1, 0, 2, 2] + 1
    assert qt.q.tolist() == [[0, 1, 3, 3]]
    assert qt.dequantize()[0].tolist() == pytest.approx([-0.4, 0.0, 0.8, 0.8])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_minmax_round_trip_within_half_step(bits, symmetric, granularity):
    weight = torch.randn(16, 64) * torch.linspace(0.1, 3.0, 16).unsqueeze(1)
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=16, symmetric=symmetric)
    err, scale, low, high, _ = _scheme_error(weight, spec)
    # min/max: the grid [low, high] widened by half a step covers every value, even with the zero point rounded
    slack = scale / 2 + 1e-6 * weight.abs()
    assert bool(((weight >= low - slack) & (weight <= high + slack)).all())
    assert bool((err <= scale / 2 + 1e-6 * weight.abs()).all())  # + float32 rounding of values up to 128 s


@pytest.mark.parametrize("calibration", ["percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_calibrations_bound_inside_and_clip_outside(calibration, symmetric):
    weight = torch.distributions.StudentT(3.0).sample((8, 256))
    spec = QuantSpec(bits=4, granularity="per_channel", symmetric=symmetric, calibration=calibration, percentile=99.0)
    err, scale, low, high, qt = _scheme_error(weight, spec)
    inside = (weight >= low - scale / 2) & (weight <= high + scale / 2)
    assert bool((err[inside] <= (scale / 2 + 1e-6 * weight.abs())[inside]).all())
    outside = ~inside
    assert outside.any(), "heavy tails must be clipped by this calibration"
    clipped_to = torch.where(weight > high, high, low)[outside]
    assert torch.allclose(qt.dequantize()[outside], clipped_to, atol=1e-6)


def test_mse_never_worse_than_minmax_and_better_on_heavy_tails():
    weight = torch.distributions.StudentT(2.5).sample((32, 128))
    for granularity in ("per_channel", "per_group"):
        errs = {}
        for calibration in ("minmax", "mse"):
            spec = QuantSpec(bits=4, granularity=granularity, group_size=32, calibration=calibration)
            groups = grouped_view(weight, granularity, 32)
            deq = grouped_view(quantize_tensor(weight, spec).dequantize(), granularity, 32)
            errs[calibration] = (deq - groups).square().sum(-1)
        assert bool((errs["mse"] <= errs["minmax"] * (1 + 1e-6)).all())  # ratio 1.0 is on the grid
        assert errs["mse"].sum() < 0.9 * errs["minmax"].sum()


def test_percentile_ignores_a_single_outlier():
    weight = torch.linspace(-1, 1, 1000).reshape(1, -1).clone()
    weight[0, 0] = -50.0
    lo, hi = calibrate(grouped_view(weight, "per_tensor", 1), QuantSpec(calibration="percentile", percentile=99.0))
    assert 0.9 < hi.item() < 1.0 and lo.item() == -hi.item()
    lo, hi = calibrate(grouped_view(weight, "per_tensor", 1), QuantSpec(calibration="minmax", symmetric=False))
    assert (lo.item(), hi.item()) == (-50.0, 1.0)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8),
        QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=8),
        QuantSpec(bits=3, symmetric=False, calibration="mse"),
        QuantSpec(bits=2, symmetric=False, calibration="percentile", granularity="per_tensor"),
        QuantSpec(bits=4, symmetric=False, scale_dtype="float16"),
    ],
    ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}-{s.calibration}-{s.scale_dtype}",
)
def test_zero_stays_exactly_zero(spec):
    weight = torch.randn(12, 32) + 0.7  # mostly positive: the asymmetric zero point is far from the middle
    weight[torch.rand_like(weight) < 0.5] = 0.0
    weight[3] = 0.0  # an all-zero row
    deq = quantize_tensor(weight, spec).dequantize()
    assert bool((deq[weight == 0] == 0).all())
    assert torch.isfinite(deq).all()


def test_float16_scales_round_up_and_keep_the_bound():
    weight = torch.randn(64, 128)
    spec32, spec16 = QuantSpec(bits=4), QuantSpec(bits=4, scale_dtype="float16")
    q32, q16 = quantize_tensor(weight, spec32), quantize_tensor(weight, spec16)
    assert q16.scale.dtype == torch.float16 and q32.scale.dtype == torch.float32
    assert bool((q16.scale.float() >= q32.scale).all())
    assert bool((q16.scale.float() <= q32.scale * (1 + 2**-10)).all())
    err = (q16.dequantize() - weight).abs()
    assert bool((err <= q16.scale.float() / 2 + 1e-6 * weight.abs()).all())
    assert abs(sqnr_db(weight, q16.dequantize()) - sqnr_db(weight, q32.dequantize())) < 0.05


def test_grouped_view_shapes_and_group_size_error():
    weight = torch.zeros(6, 4, 3, 3)  # Conv2d: in = 4 * 3 * 3 = 36
    assert grouped_view(weight, "per_tensor", 1).shape == (1, 1, 216)
    assert grouped_view(weight, "per_channel", 1).shape == (6, 1, 36)
    assert grouped_view(weight, "per_group", 12).shape == (6, 3, 12)
    with pytest.raises(ValueError, match=r"`group_size`=8 does not divide the input size 36.*\[6, 4, 3, 2\]"):
        grouped_view(weight, "per_group", 8)


def test_int_ranges_and_codes_dtypes():
    assert int_range(4, True) == (-8, 7) and int_range(4, False) == (0, 15)
    assert int_range(8, True) == (-128, 127) and int_range(2, False) == (0, 3)
    assert quantize_tensor(torch.randn(3, 8), QuantSpec(bits=8)).q.dtype == torch.int8
    assert quantize_tensor(torch.randn(3, 8), QuantSpec(bits=8, symmetric=False)).q.dtype == torch.uint8


def test_quantize_dequantize_primitives_match_formula():
    x = torch.tensor([[[0.26, -0.74, 3.0]]])
    scale, zero = choose_qparams(torch.tensor([[-1.0]]), torch.tensor([[1.0]]), QuantSpec(bits=3))
    assert scale.item() == pytest.approx(1 / 3.5)
    q = quantize(x, scale, zero, 3, True)  # x / s = [0.91, -2.59, 10.5] -> [1, -3, 4 -> 3]
    assert q.tolist() == [[[1, -3, 3]]]
    assert dequantize(q, scale, zero)[0, 0].tolist() == pytest.approx([1 / 3.5, -3 / 3.5, 3 / 3.5])


def test_sqnr_db_values():
    w = torch.randn(100)
    assert sqnr_db(w, w * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise = 0.1 w -> 10 log10(1 / 0.01)
    assert sqnr_db(w, w) == math.inf


def test_int_weight_is_exact_for_per_channel_and_refused_for_groups():
    weight = torch.randn(8, 16)
    for spec in (QuantSpec(bits=8), QuantSpec(bits=4, symmetric=False), QuantSpec(bits=7, symmetric=False)):
        qt = quantize_tensor(weight, spec)
        assert torch.equal(qt.int_weight().float() * qt.row_scale().unsqueeze(1), qt.dequantize())
    assert quantize_tensor(weight, QuantSpec(bits=8, symmetric=False)).int_weight() is None
    assert quantize_tensor(weight, QuantSpec(granularity="per_group", group_size=8)).int_weight() is None


def test_deterministic():
    weight = torch.randn(32, 64)
    spec = QuantSpec(bits=3, calibration="mse", granularity="per_group", group_size=16, symmetric=False)
    a, b = quantize_tensor(weight, spec), quantize_tensor(weight.clone(), spec)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 1}, ValueError, r"`bits` must be an integer in \[2, 8\], got 1"),
        ({"bits": 9}, ValueError, r"`bits` must be an integer in \[2, 8\], got 9"),
        ({"bits": 4.0}, TypeError, r"`bits` must be an integer, got 4.0"),
        ({"granularity": "per_row"}, ValueError, r"`granularity` must be one of \['per_channel', .*got 'per_row'"),
        ({"group_size": 0}, ValueError, r"`group_size` must be an integer in \[1, inf\], got 0"),
        ({"symmetric": "yes"}, TypeError, r"`symmetric` must be True or False, got 'yes'"),
        ({"calibration": "max"}, ValueError, r"`calibration` must be one of \['minmax', 'mse', 'percentile'\]"),
        ({"percentile": 40}, ValueError, r"`percentile` must be a number in \(50, 100\], got 40"),
        ({"mse_grid": 1}, ValueError, r"`mse_grid` must be an integer in \[2, 1000\], got 1"),
        ({"scale_dtype": "bfloat16"}, ValueError, r"`scale_dtype` must be one of \['float16', 'float32'\]"),
    ],
)
def test_spec_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantSpec(**kwargs)


def test_mse_calibration_runs_the_fast_search_and_beats_the_exhaustive_grid():
    """``calibrate(..., "mse")`` is the fast search of :mod:`calibration`; its total error is at most the old
    exhaustive grid's (kept there as the reference)."""
    from lightning_compress.quantization.calibration import exhaustive_mse_search, mse_search

    weight = torch.distributions.StudentT(2.5).sample((32, 128))
    spec = QuantSpec(bits=3, granularity="per_group", group_size=32, calibration="mse")
    groups = grouped_view(weight, spec.granularity, spec.group_size)
    lo, hi = calibrate(groups, spec)
    fast = mse_search(groups, *torch.aminmax(groups, dim=-1), spec)
    assert torch.equal(lo, fast[0]) and torch.equal(hi, fast[1])

    def total_error(bounds):
        scale, zero = choose_qparams(*bounds, spec)
        return (dequantize(quantize(groups, scale, zero, 3, True), scale, zero) - groups).square().sum()

    reference = exhaustive_mse_search(groups, *torch.aminmax(groups, dim=-1), spec)
    assert total_error((lo, hi)) <= total_error(reference) * (1 + 1e-6)
