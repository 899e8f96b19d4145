"""Int8Linear: exact integer accumulation, the activation-rounding error bound, swapping, real-data accuracy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.demos.data import MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.quantization import Int8Linear, quantize
from lightning_compress.quantization.kernels import swap_int8_linear, torchao_quantize_
from lightning_compress.quantization.primitives import QuantSpec, quantize_tensor


def _activation_bound(x, weight):
    """|y_int - y_float| per output: half an activation step times the row's L1 norm of the (dequantized) weight."""
    x_scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return x_scale / 2 * weight.abs().sum(dim=1) + 1e-5 * (x.abs() @ weight.abs().t()) + 1e-6


@pytest.mark.parametrize("bias", [True, False])
def test_matches_dequantized_linear_within_activation_rounding_bound(bias):
    linear = nn.Linear(96, 40, bias=bias)
    layer = Int8Linear.from_linear(linear)
    dequantized = layer.dequantized_weight()
    x = torch.randn(33, 96) * torch.linspace(0.1, 10, 33).unsqueeze(1)
    ref = F.linear(x, dequantized, linear.bias)
    out = layer(x)
    assert (out - ref).abs().le(_activation_bound(x, dequantized)).all()
    assert not torch.equal(out, ref)  # activations really were rounded


def test_integer_accumulation_is_exact_when_activations_are_on_the_grid():
    qweight = torch.randint(-128, 128, (8, 16), dtype=torch.int8)
    layer = Int8Linear(qweight, torch.full((8,), 0.5), bias=None)
    codes = torch.randint(-127, 128, (5, 16)).float()
    codes[:, 0] = 127  # row max |x| = 127 -> activation scale exactly 1, no rounding
    expected = (codes.long() @ qweight.long().t()).float() * 0.5
    assert torch.equal(layer(codes), expected)


def test_shapes_zero_rows_and_empty_batches():
    layer = Int8Linear.from_linear(nn.Linear(12, 6))
    x = torch.randn(2, 3, 12)
    x[0, 1] = 0.0
    out = layer(x)
    assert out.shape == (2, 3, 6)
    assert torch.equal(out[0, 1], layer.bias)  # an all-zero row gives exactly the bias
    assert layer(torch.randn(0, 12)).shape == (0, 6)


def test_from_quantized_uses_the_exported_codes_and_refuses_groups():
    linear = nn.Linear(32, 8)
    for spec in (QuantSpec(bits=4), QuantSpec(bits=4, symmetric=False), QuantSpec(bits=8, granularity="per_tensor")):
        qt = quantize_tensor(linear.weight, spec)
        assert torch.equal(Int8Linear.from_quantized(linear, qt).dequantized_weight(), qt.dequantize())
    grouped = quantize_tensor(linear.weight, QuantSpec(granularity="per_group", group_size=8))
    with pytest.raises(ValueError, match="8-bit per_group weight .* has no int8 form"):
        Int8Linear.from_quantized(linear, grouped)


def test_constructor_checks():
    with pytest.raises(ValueError, match=r"`qweight` must be a 2-D int8 tensor, got torch.float32"):
        Int8Linear(torch.zeros(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match=r"`weight_scale` must hold 2 scales \(one per row\), got 3"):
        Int8Linear(torch.zeros(2, 2, dtype=torch.int8), torch.ones(3))


def test_swap_replaces_only_plain_linears_with_codes():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.Conv1d(1, 1, 1))
    result = quantize(model, bits=8, module_types=["Linear", "Conv1d"])
    codes = {layer.key: layer.qtensor for name, layer in result.layers.items() if name != "2"}
    assert swap_int8_linear(model, codes) == ["0"]
    assert isinstance(model[0], Int8Linear) and type(model[2]) is nn.Linear and type(model[3]) is nn.Conv1d


def test_torchao_helper_checks_arguments_before_importing():
    with pytest.raises(ValueError, match=r"`config` must be one of \['int4_weight_only', 'int8_dynamic'"):
        torchao_quantize_(nn.Linear(4, 4), "int2")
    with pytest.raises(ValueError, match=r"`group_size` must be an integer in \[1, inf\], got 0"):
        torchao_quantize_(nn.Linear(4, 4), "int4_weight_only", group_size=0)


@pytest.mark.slow
def test_real_mnist_int_kernels_match_dequantized_model():
    torch.manual_seed(0)
    dm = MNIST5kDataModule(batch_size=250, seed=0)
    dm.setup("fit")
    model = MLPClassifier(hidden=[256, 128])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(2):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    quantize(model, bits=8)
    ints = copy.deepcopy(model)
    for name in ("1", "3", "5"):
        ints.net[int(name)] = Int8Linear.from_linear(model.net[int(name)])
    hits_float = hits_int = agree = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            ref, out = model(x), ints(x)
            # errors compound over 3 layers; each adds <= 1/254 of its input row's max per element
            assert (out - ref).abs().max() <= 0.03 * ref.abs().max()
            hits_float += int((ref.argmax(-1) == y).sum())
            hits_int += int((out.argmax(-1) == y).sum())
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
    n = len(dm.test_dataloader().dataset)
    assert hits_float / n > 0.85
    assert abs(hits_float - hits_int) / n <= 0.005  # within half an accuracy point
    assert agree / n >= 0.99
