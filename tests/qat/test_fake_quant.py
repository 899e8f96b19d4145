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
    before = quantizer.effective_scale().detach().clone()
    optimizer = torch.optim.Adam([weight, quantizer.log_gain], lr=1e-2)
    target = torch.randn(8, 32)
    for _ in range(20):
        optimizer.zero_grad()
        (quantizer(weight) - target).square().sum().backward()
        optimizer.step()
    assert not torch.equal(quantizer.effective_scale().detach(), before)
    assert torch.equal(quantizer(weight).detach(), quantizer.codes(weight).dequantize())


def test_weight_gradient_is_straight_through_inside_the_range_and_zero_outside() -> None:
    spec = QuantSpec(bits=2, granularity="per_tensor")
    quantizer = LSQFakeQuantizer(torch.tensor([[0.5, -0.5, 0.1, 0.2]]), spec)
    quantizer.load(torch.full((1, 1), 0.5))  # 2 bits: codes -2..1, so the range is [-1.0, 0.5]
    weight = torch.tensor([[0.3, -0.4, 2.0, -3.0]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    quantizer(weight).backward(upstream)
    assert torch.equal(weight.grad, torch.tensor([[1.0, 2.0, 0.0, 0.0]]))


def test_log_gain_gradient_is_lsq_scale_gradient_over_the_base_scale() -> None:
    """d/dlog_gain is LSQ's scaled dL/ds times qmax * s / s0: qmax at the start (s = s0)."""
    spec = QuantSpec(bits=3, granularity="per_tensor")
    weight = torch.tensor([[0.26, -0.61, 5.0, -5.0]])
    quantizer = LSQFakeQuantizer(weight, spec)
    quantizer.load(torch.full((1, 1), 0.2))
    quantizer(weight).sum().backward()
    v = weight / 0.2  # 1.3, -3.05, 25, -25 -> codes 1, -3, 3 (clipped), -4 (clipped)
    expected = (torch.round(v[0, :2]) - v[0, :2]).sum() + 3 + (-4)
    factor = lsq_grad_factor(4, 3)
    assert factor == pytest.approx(1 / math.sqrt(4 * 3))
    assert quantizer.log_gain.grad.item() == pytest.approx(expected.item() * factor * 3, rel=1e-5)


def test_sgd_moves_the_scale_as_lsq_linear_step_would() -> None:
    """Near s0 an SGD step on log_gain is LSQ's linear step on s (to first order in the learning rate)."""
    torch.manual_seed(3)
    weight = torch.randn(4, 16)
    quantizer = LSQFakeQuantizer(weight, QuantSpec(bits=3))
    s0 = quantizer.effective_scale().detach().clone()
    linear = s0.clone().requires_grad_(True)  # LSQ's own parametrization, its gradient scaled by g
    groups = weight / linear
    codes = torch.round(groups.clamp(-4, 3)).detach() + (groups.clamp(-4, 3) - groups.clamp(-4, 3).detach())
    (codes * linear).square().sum().backward()
    quantizer(weight).square().sum().backward()
    lr = 1e-6
    with torch.no_grad():
        quantizer.log_gain -= lr * quantizer.log_gain.grad
    expected = s0 - lr * linear.grad * quantizer.grad_factor
    assert torch.allclose(quantizer.effective_scale().detach(), expected, rtol=1e-6, atol=0)
    assert not torch.equal(quantizer.effective_scale().detach(), s0)


def test_adam_moves_every_clipping_edge_by_about_lr_whatever_its_size() -> None:
    """The defect this parametrization fixes: Adam moved a linear scale by ~lr per step (its clipping edge by
    qmax * lr), driving small int8 steps to the clamp. Here Adam's first step (size lr on the parameter) moves
    every row's edge qmax * s by about lr, as a ratio of s, for rows four orders of magnitude apart."""
    torch.manual_seed(4)
    weight = torch.randn(4, 32) * torch.tensor([[1e-2], [1e-1], [1.0], [10.0]])
    quantizer = LSQFakeQuantizer(weight, QuantSpec(bits=8))
    s0 = quantizer.effective_scale().detach().clone()
    lr = 1e-4
    optimizer = torch.optim.Adam([quantizer.log_gain], lr=lr)
    (quantizer(weight) - 0.9 * weight).square().sum().backward()
    optimizer.step()
    edge_moved = (quantizer.effective_scale().detach() - s0).abs() * 127
    assert torch.allclose(edge_moved, torch.full_like(edge_moved, lr), rtol=0.02), edge_moved
    assert bool((quantizer.effective_scale() > 0).all())


def test_load_resumes_exactly_and_a_plain_scale_resumes_with_gain_zero() -> None:
    torch.manual_seed(5)
    weight = torch.randn(6, 8)
    trained = LSQFakeQuantizer(weight, QuantSpec(bits=4))
    with torch.no_grad():
        trained.log_gain.normal_(0, 0.1)
    fresh = LSQFakeQuantizer(torch.randn(6, 8), QuantSpec(bits=4))
    fresh.load(trained.base_scale, trained.log_gain)
    assert torch.equal(fresh(weight), trained(weight))
    plain = trained.effective_scale().detach()  # what a checkpoint of a linear scale held
    fresh.load(plain)
    assert torch.equal(fresh.effective_scale().detach(), plain) and not bool(fresh.log_gain.any())


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
        quantizer.base_scale[0] = 0.0
        quantizer.log_gain[1] = -500.0  # exp underflows to 0
    out = quantizer(weight)
    assert bool(out.isfinite().all())
    assert torch.equal(out, quantizer.codes(weight).dequantize())
