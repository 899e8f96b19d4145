"""The fast MSE clipping search against the exhaustive grid search (the reference), and the calibration-data helpers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_compress.quantization.calibration as calibration
from lightning_compress.quantization.calibration import (
    exhaustive_mse_search,
    feed,
    mse_search,
    take_batches,
    to_device,
)
from lightning_compress.quantization.primitives import QuantSpec, choose_qparams, dequantize, grouped_view, quantize


def _error(x, lo, hi, spec):
    """Squared reconstruction error per (row, group) of the range ``(lo, hi)``."""
    scale, zero = choose_qparams(lo, hi, spec)
    return (dequantize(quantize(x, scale, zero, spec.bits, spec.symmetric), scale, zero) - x).square().sum(-1)


def _compare(weight, spec):
    x = grouped_view(weight, spec.granularity, spec.group_size).float()
    lo, hi = torch.aminmax(x, dim=-1)
    fast = _error(x, *mse_search(x, lo, hi, spec), spec)
    reference = _error(x, *exhaustive_mse_search(x, lo, hi, spec), spec)
    minmax = _error(x, lo, hi, spec)
    return fast, reference, minmax


@pytest.fixture(scope="module")
def digits_weights():
    """Weights of a small MLP trained (briefly) on sklearn's real 8x8 digits."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model(x).argmax(-1) == y).float().mean() > 0.9  # it learned: these are trained weights
    return [model[0].weight.detach(), model[2].weight.detach()]


SPECS = [
    QuantSpec(bits=b, granularity=g, group_size=32, symmetric=s, calibration="mse")
    for b in (2, 3, 4, 8)
    for g in ("per_channel", "per_group")
    for s in (True, False)
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("dist", ["gauss", "student_t"])
def test_fast_search_error_at_most_the_exhaustive_grid_on_random_weights(spec, dist):
    torch.manual_seed(1)
    weight = torch.randn(96, 256) if dist == "gauss" else torch.distributions.StudentT(3.0).sample((96, 256))
    fast, reference, minmax = _compare(weight, spec)
    assert fast.sum() <= reference.sum() * (1 + 1e-6)
    assert bool((fast <= minmax * (1 + 1e-5) + 1e-12).all())  # ratio 1 (min/max) is always evaluated


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_fast_search_error_at_most_the_exhaustive_grid_on_trained_weights(spec, digits_weights):
    for weight in digits_weights:
        fast, reference, _ = _compare(weight, spec)
        assert fast.sum() <= reference.sum() * (1 + 1e-6)


def test_fast_search_evaluates_far_fewer_ratios(monkeypatch):
    """The cost: at most ~40 % of the exhaustive grid's full-tensor evaluations (coarse + fine + 2 least squares)."""
    calls = []
    real = calibration._errors
    monkeypatch.setattr(calibration, "_errors", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(calibration, "CHUNK_ELEMENTS", 1 << 30)  # one chunk: one call = one pass over the tensor
    spec = QuantSpec(bits=4, calibration="mse", mse_grid=80)
    x = grouped_view(torch.randn(64, 512), "per_channel", 1)
    mse_search(x, *torch.aminmax(x, dim=-1), spec)
    assert len(calls) <= 0.4 * spec.mse_grid


def test_chunking_does_not_change_the_result(monkeypatch):
    spec = QuantSpec(bits=3, granularity="per_group", group_size=16, calibration="mse", symmetric=False)
    x = grouped_view(torch.randn(40, 64), spec.granularity, spec.group_size)
    lo, hi = torch.aminmax(x, dim=-1)
    whole = mse_search(x, lo, hi, spec)
    monkeypatch.setattr(calibration, "CHUNK_ELEMENTS", 100)  # many small chunks, a ragged last one
    chunked = mse_search(x, lo, hi, spec)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_float16_scales_through_the_search_keep_the_half_step_bound_inside_the_range():
    weight = torch.randn(16, 128)
    spec = QuantSpec(bits=4, calibration="mse", scale_dtype="float16")
    x = grouped_view(weight, "per_channel", 1)
    lo, hi = mse_search(x, *torch.aminmax(x, dim=-1), spec)
    scale, zero = choose_qparams(lo, hi, spec)
    assert scale.dtype == torch.float16
    err = (dequantize(quantize(x, scale, zero, 4, True), scale, zero) - x).abs()
    inside = x.abs() <= 7 * scale.float().unsqueeze(-1)
    assert bool((err[inside] <= (scale.float().unsqueeze(-1) / 2 + 1e-6).expand_as(x)[inside]).all())


# ---------------------------------------------------------------------------------------------- calibration data
class _KwModel(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return input_ids.float() * (1 if attention_mask is None else attention_mask)


def test_feed_dict_tuple_and_plain_batches():
    ids = torch.arange(6).reshape(2, 3)
    assert torch.equal(feed(_KwModel(), {"input_ids": ids, "attention_mask": torch.ones(2, 3)}), ids.float())
    linear = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    assert torch.equal(feed(linear, (x, torch.zeros(4))), linear(x))
    assert torch.equal(feed(linear, x), linear(x))


def test_to_device_nested_and_take_batches_bounded():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), "text"]}
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["a"], batch["a"]) and moved["b"][1] == "text"
    assert len(take_batches(iter(range(100)), 7)) == 7
    assert take_batches([1, 2], 7) == [1, 2]


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (torch.randn(3, 4), TypeError, r"`calibration_data` must be an iterable of batches .*got Tensor"),
        (5, TypeError, r"`calibration_data` must be an iterable of batches .*got int"),
        ([], ValueError, r"`calibration_data` yielded no batch"),
    ],
)
def test_take_batches_errors(data, error, match):
    with pytest.raises(error, match=match):
        take_batches(data, 4)


def _weighted_error(x, lo, hi, spec, w):
    scale, zero = choose_qparams(lo, hi, spec)
    return ((dequantize(quantize(x, scale, zero, spec.bits, spec.symmetric), scale, zero) - x).square() * w).sum(-1)


LOW = SPECS[:8]  # 2 and 3 bits, where the choice of range matters most


@pytest.mark.parametrize("spec", LOW, ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_weighted_search_lowers_the_weighted_error(spec):
    """Per-column weights (an input's mean square, heavy-tailed like outlier channels): the weighted search's weighted
    error is at most min/max's per (row, group) and, in total, at most the unweighted search's; unit weights change
    nothing."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 128, generator=g)
    x = grouped_view(weight, spec.granularity, spec.group_size).float()
    lo, hi = torch.aminmax(x, dim=-1)
    w = (torch.randn(128, generator=g).exp() ** 3).reshape(1, x.shape[1], x.shape[2])
    weighted = _weighted_error(x, *mse_search(x, lo, hi, spec, weights=w), spec, w)
    plain = _weighted_error(x, *mse_search(x, lo, hi, spec), spec, w)
    assert (weighted <= _weighted_error(x, lo, hi, spec, w) * (1 + 1e-5)).all()
    assert weighted.sum() <= plain.sum()
    ones = torch.ones_like(w)
    for a, b in zip(mse_search(x, lo, hi, spec, weights=ones), mse_search(x, lo, hi, spec)):
        torch.testing.assert_close(a, b)
