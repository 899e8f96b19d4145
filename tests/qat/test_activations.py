"""InputFakeQuantizer and its pre-hooks: ORT's uint8 QuantizeLinear -> DequantizeLinear in the forward, LSQ in the
backward, first-batch initialisation, forward signatures untouched. Random tensors: shape / unit checks only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress.qat.activations import InputFakeQuantizer, attach, detach, ranges, strip_keys
from lightning_compress.serving._graph import uint8_qparams


def _reference(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """ORT's QuantizeLinear (x / s, round half to even, + z, saturate to uint8) then DequantizeLinear."""
    s = torch.tensor(scale, dtype=torch.float32)
    q = torch.clamp(torch.round(x / s) + zero_point, 0, 255)
    return (q - zero_point) * s


def test_the_forward_is_orts_uint8_quantize_dequantize() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16) * 3
    quantizer = InputFakeQuantizer((0.02, 100))
    assert torch.equal(quantizer(x), _reference(x, 0.02, 100))


def test_the_first_batch_sets_the_range_the_export_would_calibrate() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16) - 0.5
    quantizer = InputFakeQuantizer()
    assert not quantizer.initialized
    out = quantizer(x)
    scale, zero_point = uint8_qparams(float(x.min()), float(x.max()))
    assert quantizer.range() == (pytest.approx(scale, rel=1e-6), zero_point)  # exp(log s) in float32
    assert torch.equal(out, _reference(x, *quantizer.range()))
    relu = InputFakeQuantizer()
    relu(torch.relu(x))
    assert relu.zero_point == 0  # a ReLU's output: zero point 0


def test_straight_through_inside_the_range_zero_outside_and_a_scale_gradient() -> None:
    x = torch.tensor([[-1.0, 0.013, 0.5, 10.0]], requires_grad=True)  # range [-0.98, 1.57] with s = 0.01, z = 98
    quantizer = InputFakeQuantizer((0.01, 98))
    quantizer(x).sum().backward()
    assert x.grad is not None and quantizer.log_scale.grad is not None
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert quantizer.log_scale.grad.abs().item() > 0


def test_fixed_ranges_apply_the_given_scale_exactly_and_do_not_learn() -> None:
    x = torch.linspace(-1, 1, 101)
    quantizer = InputFakeQuantizer((0.0123, 7), learn=False)
    assert not quantizer.log_scale.requires_grad
    assert quantizer.range() == (float(torch.tensor(0.0123)), 7)
    assert torch.equal(quantizer(x), _reference(x, 0.0123, 7))


def test_a_resumed_state_gives_the_same_range_bit_for_bit() -> None:
    trained = InputFakeQuantizer()
    trained(torch.rand(4, 8) * 0.3)
    with torch.no_grad():
        trained.log_scale.add_(0.123456)  # as if trained
    resumed = InputFakeQuantizer(state=trained.state())
    assert resumed.initialized and resumed.range() == trained.range()


@pytest.mark.parametrize(
    ("scale", "zero_point", "match"),
    [
        (0.0, 0, "scale must be a finite number > 0, got 0.0"),
        (float("nan"), 0, "scale must be a finite number > 0"),
        (-1.0, 0, "scale must be a finite number > 0"),
        ("0.1", 0, "scale must be a finite number > 0, got '0.1'"),
        (0.1, 256, "zero point must be an integer in 0..255, got 256"),
        (0.1, -1, "zero point must be an integer in 0..255"),
        (0.1, 1.5, "zero point must be an integer in 0..255, got 1.5"),
    ],
)
def test_bad_ranges_are_refused_before_any_hook(scale: object, zero_point: object, match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=match):
        attach({"0": model[0], "1": model[1]}, {"0": "0.weight", "1": "1.weight"},
               {"0.weight": (0.1, 0), "1.weight": (scale, zero_point)})  # type: ignore[dict-item]
    assert not model[0]._forward_pre_hooks and not model[1]._forward_pre_hooks


class _KwargsModel(nn.Module):
    """A forward with a positional tensor, a keyword tensor and a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, *, shift: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.b(torch.relu(self.a(x + shift)) * extra["gain"])


def test_pre_hooks_quantize_the_layer_inputs_and_leave_the_forward_signature_alone() -> None:
    torch.manual_seed(0)
    model = _KwargsModel()
    keys = {"a": "a.weight", "b": "b.weight"}
    x, shift, gain = torch.randn(4, 6), torch.randn(4, 6), torch.rand(4, 5)
    float_out = model(x, shift=shift, extra={"gain": gain}).detach()
    state_keys = list(model.state_dict())
    quantizers = attach({"a": model.a, "b": model.b}, keys, {"a.weight": (0.05, 120), "b.weight": (0.01, 0)})
    out = model(x, shift=shift, extra={"gain": gain})
    hidden = torch.relu(model.a(_reference(x + shift, 0.05, 120))) * gain
    with torch.no_grad():
        expected = nn.functional.linear(_reference(hidden, 0.01, 0), model.b.weight, model.b.bias)
    assert torch.equal(out.detach(), expected)
    state = model.state_dict()  # learning quantizers are submodules while attached (their steps: DDP parameters)
    assert set(state) - set(state_keys) == {"a.qat_input_quantizer.log_scale", "b.qat_input_quantizer.log_scale"}
    assert {id(p) for p in model.parameters()} >= {id(q.log_scale) for q in quantizers.values()}
    strip_keys(state)
    assert list(state) == state_keys  # what a checkpoint keeps: the model's own keys
    copied = copy.deepcopy(model)  # a copy quantizes too
    assert torch.equal(copied(x, shift=shift, extra={"gain": gain}), out)
    assert ranges(quantizers, keys) == {"a.weight": (pytest.approx(0.05), 120), "b.weight": (pytest.approx(0.01), 0)}
    assert detach(model, quantizers, keys) == ranges(quantizers, keys)
    assert torch.equal(model(x, shift=shift, extra={"gain": gain}), float_out)  # back to float
    assert list(model.state_dict()) == state_keys
    assert torch.equal(copied(x, shift=shift, extra={"gain": gain}), out)  # the copy keeps its own hooks
