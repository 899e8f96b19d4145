"""Int8Linear: exact integer accumulation, the activation-rounding error bound, swapping, the self-test that keeps
float where int8 is slower, real-data accuracy."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.demos.data import MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.quantization import Int8Linear, kernels, quantize
from lightning_compress.quantization.kernels import (
    POLICY_ENV,
    int8_kernel_decision,
    swap_int8_linear,
    torchao_quantize_,
)
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
    with pytest.raises(ValueError, match=r"8-bit per_group weight .* has no int8 form"):
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
    assert swap_int8_linear(model, codes, self_test=False) == ["0"]
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


# ---------------------------------------------------------------------------------------------- self-test and swap
@pytest.fixture(autouse=True)
def _fresh_decisions(monkeypatch):
    monkeypatch.setattr(kernels, "_DECISIONS", {})
    monkeypatch.delenv(POLICY_ENV, raising=False)


def _fake_timing(monkeypatch, int8_ms, float_ms):
    calls = []

    def timing(a, b, device):
        calls.append(device)
        a(), b()
        return int8_ms, float_ms

    monkeypatch.setattr(kernels, "_time_pair", timing)
    return calls


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))
    result = quantize(model, bits=8)
    return model, {layer.key: layer.qtensor for layer in result.layers.values()}


def test_slower_int8_keeps_float_with_a_warning_naming_the_cpu_and_is_cached(monkeypatch):
    calls = _fake_timing(monkeypatch, int8_ms=100.9, float_ms=4.2)  # the AVX2 figure from the issue
    model, codes = _mlp()
    with pytest.warns(UserWarning, match=r"kept float kernels .*100\.900 ms vs float F\.linear 4\.200 ms \(0\.04x"):
        swapped = swap_int8_linear(model, codes)
    assert swapped == [] and set(swapped.skipped) == {"0", "2", "4"}
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))
    assert f"capability {torch.backends.cpu.get_cpu_capability()}" in swapped.skipped["0"]
    assert len(calls) == 3  # 32->48, 48->48, 48->10: one self-test per shape ...
    with pytest.warns(UserWarning):
        swap_int8_linear(_mlp()[0], codes)
    assert len(calls) == 3  # ... and none the second time: cached for the process


def test_faster_int8_is_swapped_and_matches_the_dequantized_model(monkeypatch):
    _fake_timing(monkeypatch, int8_ms=1.0, float_ms=4.0)
    model, codes = _mlp()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning
        assert swap_int8_linear(model, codes) == ["0", "2", "4"]
    x = torch.randn(16, 32)
    assert (model(x) - reference(x)).abs().max() <= 0.02 * reference(x).abs().max()


def test_wrong_int8_results_keep_float(monkeypatch):
    monkeypatch.setattr(kernels, "int8_matmul", lambda a, b: -torch._int_mm(a, b))  # a broken kernel
    decision = int8_kernel_decision(64, 32)
    assert not decision.use_int8 and "wrong results" in decision.reason


def test_real_self_test_reports_its_measurement():
    decision = int8_kernel_decision(64, 32, batch=8)
    assert decision.int8_ms > 0 and decision.float_ms > 0
    assert decision.use_int8 == (decision.float_ms / decision.int8_ms >= kernels.SPEED_MARGIN)
    assert torch.backends.cpu.get_cpu_capability() in decision.reason
    with pytest.raises(ValueError, match=r"`batch` must be an integer in \[1, inf\], got 0"):
        int8_kernel_decision(64, 32, batch=0)


def test_per_group_and_transformer_layers_are_reported_not_silently_skipped(monkeypatch):
    _fake_timing(monkeypatch, int8_ms=1.0, float_ms=4.0)
    model = nn.Sequential(nn.Linear(32, 32), nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True))
    result = quantize(copy.deepcopy(model), bits=4, granularity="per_group", group_size=16, include=[r"^0$"])
    codes = {layer.key: layer.qtensor for layer in result.layers.values()}
    codes.update({k: quantize_tensor(model.get_parameter(k), QuantSpec()) for k in ("1.linear1.weight",
                                                                                  "1.linear2.weight")})
    with pytest.warns(UserWarning, match="3 quantized Linear layer"):
        swapped = swap_int8_linear(model, codes)
    assert swapped == []
    assert "per_group codes" in swapped.skipped["0"] and "MatMulNBits" in swapped.skipped["0"]
    assert "inside TransformerEncoderLayer" in swapped.skipped["1.linear1"]


def test_int8_linear_exposes_a_dequantized_weight_for_modules_that_read_it():
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    reference = copy.deepcopy(block)
    block.linear1 = Int8Linear.from_linear(block.linear1)
    block.linear2 = Int8Linear.from_linear(block.linear2)
    assert torch.equal(block.linear1.weight, block.linear1.dequantized_weight())
    assert block.linear1.weight.shape == (64, 32)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():  # eval + no_grad: the fused fast path, which reads `.weight`
        fast = block(x)
    slow = block(x)  # grad enabled: the Python path, which calls Int8Linear.forward
    assert (fast - reference(x)).abs().max() < 0.05 and (slow - reference(x)).abs().max() < 0.05


def test_policy_environment_variable(monkeypatch):
    calls = _fake_timing(monkeypatch, int8_ms=9.0, float_ms=1.0)
    model, codes = _mlp()
    monkeypatch.setenv(POLICY_ENV, "always")
    assert swap_int8_linear(model, codes) == ["0", "2", "4"] and calls == []
    monkeypatch.setenv(POLICY_ENV, "never")
    with pytest.warns(UserWarning, match=f"{POLICY_ENV}=never"):
        assert swap_int8_linear(_mlp()[0], codes) == []
    monkeypatch.setenv(POLICY_ENV, "fast")
    with pytest.raises(ValueError, match=rf"{POLICY_ENV} must be one of \['auto', 'always', 'never'\], got 'fast'"):
        swap_int8_linear(_mlp()[0], codes)
