"""The LSQ fake quantizer: exact codes, PTQ's MSE scale at the start, STE and LSQ gradients, pruning masks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_compress.qat.fake_quant import LSQFakeQuantizer, lsq_grad_factor
from lightning_compress.quantization.primitives import QuantSpec, quantize_tensor

CASES = [(bits, gran) for bits in (2, 3, 4, 8) for gran in ("per_tensor", "per_channel", "per_group")]


@pytest.mark.parametrize(("bits", "granularity"), CASES)
def test_forward_is_the_dequantized_codes_bit_for_bit_and_starts_at_ptq_mse(bits: int, granularity: str) -> None:
    torch.manual_seed(bits)
    weight = torch.randn(12, 3, 4, 4)  # a conv weight: 48 inputs per row, groups of 16
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=16, calibration="mse")
    quantizer = LSQFakeQuantizer(weight, spec)
    out = quantizer(weight)
    codes = quantizer.codes(weight)
    assert torch.equal(out, codes.dequantize())
    assert codes.q.dtype == torch.int8 and tuple(codes.q.shape) == tuple(weight.shape)
    assert int(codes.q.min()) >= -(1 << (bits - 1)) and int(codes.q.max()) <= (1 << (bits - 1)) - 1
    assert torch.equal(out, quantize_tensor(weight, spec).dequantize())  # initialised from post-training MSE


def test_codes_stay_exact_after_the_scale_is_trained() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 32, requires_grad=True)
    quantizer = LSQFakeQuantizer(weight.detach(), QuantSpec(bits=3, granularity="per_group", group_size=8))
    before = quantizer.scale.detach().clone()
    optimizer = torch.optim.Adam([weight, quantizer.scale], lr=1e-2)
    target = torch.randn(8, 32)
    for _ in range(20):
        optimizer.zero_grad()
        (quantizer(weight) - target).square().sum().backward()
        optimizer.step()
    assert not torch.equal(quantizer.scale.detach(), before)
    assert torch.equal(quantizer(weight).detach(), quantizer.codes(weight).dequantize())


def test_weight_gradient_is_straight_through_inside_the_range_and_zero_outside() -> None:
    spec = QuantSpec(bits=2, granularity="per_tensor")
    quantizer = LSQFakeQuantizer(torch.tensor([[0.5, -0.5, 0.1, 0.2]]), spec)
    with torch.no_grad():
        quantizer.scale.fill_(0.5)  # 2 bits: codes -2..1, so the range is [-1.0, 0.5]
    weight = torch.tensor([[0.3, -0.4, 2.0, -3.0]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    quantizer(weight).backward(upstream)
    assert torch.equal(weight.grad, torch.tensor([[1.0, 2.0, 0.0, 0.0]]))


def test_scale_gradient_is_lsq_with_its_scaling_factor() -> None:
    spec = QuantSpec(bits=3, granularity="per_tensor")
    weight = torch.tensor([[0.26, -0.61, 5.0, -5.0]])
    quantizer = LSQFakeQuantizer(weight, spec)
    with torch.no_grad():
        quantizer.scale.fill_(0.2)
    quantizer(weight).sum().backward()
    v = weight / 0.2  # 1.3, -3.05, 25, -25 -> codes 1, -3, 3 (clipped), -4 (clipped)
    expected = (torch.round(v[0, :2]) - v[0, :2]).sum() + 3 + (-4)
    factor = lsq_grad_factor(4, 3)
    assert factor == pytest.approx(1 / math.sqrt(4 * 3))
    assert quantizer.scale.grad.item() == pytest.approx(expected.item() * factor, rel=1e-5)


def test_pruned_weights_stay_exactly_zero_in_forward_codes_and_gradient() -> None:
    torch.manual_seed(1)
    weight = torch.randn(6, 10, requires_grad=True)
    keep = torch.rand(6, 10) > 0.5
    quantizer = LSQFakeQuantizer(weight.detach(), QuantSpec(bits=4), keep)
    out = quantizer(weight)
    assert bool((out[~keep] == 0).all()) and bool((out[keep] != 0).any())
    assert bool((quantizer.codes(weight).q[~keep] == 0).all())
    out.square().sum().backward()
    assert bool((weight.grad[~keep] == 0).all())


def test_asymmetric_is_refused() -> None:
    with pytest.raises(ValueError, match="symmetric only"):
        LSQFakeQuantizer(torch.randn(2, 4), QuantSpec(symmetric=False))


def test_a_non_positive_scale_is_clamped_not_divided_by() -> None:
    weight = torch.randn(3, 4)
    quantizer = LSQFakeQuantizer(weight, QuantSpec(bits=4))
    with torch.no_grad():
        quantizer.scale[0] = -1.0
    out = quantizer(weight)
    assert bool(out.isfinite().all())
    assert torch.equal(out, quantizer.codes(weight).dequantize())
