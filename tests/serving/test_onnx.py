"""export_onnx: our codes reach ONNX Runtime's integer kernels unchanged, ORT agrees with the in-memory model."""

import copy
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.quantization import quantize, save_quantized
from lightning_compress.quantization.kernels import swap_int8_linear
from lightning_compress.serving import INTEGER_OPS, export_onnx
from lightning_compress.structure.compaction import compact

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))


def _cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10),
    ).eval()
    with torch.no_grad():  # a BatchNorm that is not the identity (some negative factors)
        model[1].weight.uniform_(-2, 2)
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2)
    return model


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), real digits
    return x, torch.tensor(data.target)


def _train(model, digits, epochs=15):
    x, y = digits
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for i in range(0, 1400, 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 100]), y[i : i + 100]).backward()
            opt.step()
    return model.eval()


def _initializers(path):
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


def _ops(path):
    return [n.op_type for n in onnx.load(path).graph.node]


def test_float_model_exports_as_float_and_matches(tmp_path, digits):
    model = _mlp().eval()
    report = export_onnx(model, tmp_path / "f.onnx", digits[0][:4], calibration_data=digits[0][:256])
    assert report.layers == {} and report.not_integer == {}
    assert report.samples == 260 and report.max_abs_diff < 1e-4 and report.argmax_agreement == 1.0
    assert "MatMulInteger" not in _ops(tmp_path / "f.onnx")


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_int8_per_channel_runs_on_integer_ops_with_our_codes(tmp_path, digits, activations):
    model = _train(_mlp(), digits)
    result = quantize(model, bits=8)
    x = digits[0][1400:]
    report = export_onnx(model, tmp_path / "q.onnx", x[:4], result, activations=activations, calibration_data=x)
    assert set(report.layers) == {"1", "3", "5"} and report.not_integer == {}
    expected = {"dynamic": {"DynamicQuantizeMatMul"}, "static": {"QGemm"}}[activations]
    assert {layer.runtime_op for layer in report.layers.values()} == expected
    stored = _initializers(tmp_path / "q.onnx")
    for name, layer in result.layers.items():
        codes = stored[report.layers[name].codes]
        ours = layer.qtensor.q.numpy()
        assert codes.dtype == np.int8 and np.array_equal(codes, ours.T if activations == "dynamic" else ours)
    # only the activation rounding differs from the dequantized float model
    assert report.argmax_agreement >= 0.99 and report.max_abs_diff < 0.05 * float(model(x).detach().abs().max())
    assert report.nbytes < 0.4 * sum(p.numel() * 4 for p in model.parameters())


def test_int4_per_group_becomes_matmulnbits_holding_our_codes(tmp_path, digits):
    model = _train(_mlp(), digits)
    result = quantize(model, bits=4, granularity="per_group", group_size=32)
    x = digits[0][1400:]
    report = export_onnx(model, tmp_path / "q4.onnx", x[:4], result, accuracy_level=0, calibration_data=x)
    assert {layer.runtime_op for layer in report.layers.values()} == {"MatMulNBits"} and report.not_integer == {}
    packed = _initializers(tmp_path / "q4.onnx")[report.layers["1"].codes]  # (N, blocks, block / 2) uint8
    unpacked = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(96, 64).astype(np.int16) - 8
    assert np.array_equal(unpacked, result.layers["1"].qtensor.q.numpy())
    # accuracy_level=0 computes in float: ORT equals the dequantized model up to float rounding
    assert report.max_abs_diff < 1e-4 and report.argmax_agreement == 1.0


@pytest.mark.parametrize(("bits", "granularity", "symmetric"), [
    (4, "per_group", False),  # packed uint8 zero points
    (3, "per_channel", False),  # 3-bit codes in 4-bit blocks, one scale per row repeated over the blocks
    (8, "per_group", True),  # 8-bit MatMulNBits
    (6, "per_group", False),
])
def test_matmulnbits_variants_reproduce_the_dequantized_model(tmp_path, digits, bits, granularity, symmetric):
    model = _train(_mlp(), digits, epochs=2)
    result = quantize(model, bits=bits, granularity=granularity, group_size=16, symmetric=symmetric)
    x = digits[0][1400:]
    report = export_onnx(model, tmp_path / "n.onnx", x[:4], result, accuracy_level=0, calibration_data=x)
    assert {layer.runtime_op for layer in report.layers.values()} == {"MatMulNBits"}
    assert report.max_abs_diff < 1e-4 and report.argmax_agreement == 1.0


def test_group_size_without_a_power_of_two_block_is_reported_by_name(tmp_path, digits):
    model = _mlp().eval()
    result = quantize(model, bits=4, granularity="per_group", group_size=8, include=[r"^1$"])
    report = export_onnx(model, tmp_path / "g8.onnx", digits[0][:4], result)
    assert list(report.not_integer) == ["1"]
    assert "group_size 8 is not a multiple of 16" in report.not_integer["1"]
    assert report.max_abs_diff < 1e-4  # kept float on DequantizeLinear of our codes: still the same model


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_cnn_convolutions_get_integer_kernels(tmp_path, digits, activations):
    model = _train(_cnn(), digits, epochs=6)
    result = quantize(model, bits=8, module_types=["Conv2d", "Linear"])
    x = digits[0][1400:]
    report = export_onnx(model, tmp_path / "c.onnx", x[:4], result, activations=activations, calibration_data=x)
    assert report.not_integer == {}, str(report)
    conv = {"dynamic": "ConvInteger", "static": ("QLinearConv", "NhwcQLinearConv")}[activations]
    assert report.layers["0"].runtime_op in conv and report.layers["4"].runtime_op in conv
    assert report.argmax_agreement >= 0.99
    stored = _initializers(tmp_path / "c.onnx")  # the BatchNorm folded into conv 0 changed its scales, not codes
    assert np.array_equal(stored[report.layers["0"].codes], result.layers["0"].qtensor.q.numpy())


def test_per_group_conv_is_reported_not_silently_float(tmp_path, digits):
    model = _cnn()
    result = quantize(model, bits=8, granularity="per_group", group_size=9, module_types=["Conv2d"])
    report = export_onnx(model, tmp_path / "c.onnx", digits[0][:4], result)
    assert set(report.not_integer) == {"0", "4"} and "no int8 form" in report.not_integer["0"]
    assert report.max_abs_diff < 1e-4


def test_compacted_then_quantized_model(tmp_path, digits):
    model = _train(_mlp(), digits, epochs=3)
    keep = {"1": torch.arange(96) % 3 != 0, "3": torch.arange(64) % 2 == 0}
    small = compact(model, keep, digits[0][:2]).model.eval()
    result = quantize(small, bits=8)
    report = export_onnx(small, tmp_path / "s.onnx", digits[0][:4], result, calibration_data=digits[0][1400:])
    shapes = {v.shape for k, v in _initializers(tmp_path / "s.onnx").items() if k == report.layers["3"].codes}
    assert shapes == {(64, 32)} and report.not_integer == {}
    assert report.argmax_agreement >= 0.99


def test_codes_from_a_saved_file_and_from_int8_linear_layers(tmp_path, digits):
    model = _train(_mlp(), digits, epochs=3)
    result = quantize(model, bits=8)
    save_quantized(model, result, tmp_path / "m.safetensors")
    x = digits[0][:64]
    from_file = export_onnx(model, tmp_path / "a.onnx", x, tmp_path / "m.safetensors")
    ints = copy.deepcopy(model)
    swap_int8_linear(ints, {layer.key: layer.qtensor for layer in result.layers.values()}, self_test=False)
    from_modules = export_onnx(ints, tmp_path / "b.onnx", x)
    assert set(from_file.layers) == set(from_modules.layers) == {"1", "3", "5"}
    assert from_modules.not_integer == {} and from_modules.argmax_agreement >= 0.98
    a, b = _initializers(tmp_path / "a.onnx"), _initializers(tmp_path / "b.onnx")
    assert all(np.array_equal(a[from_file.layers[n].codes], b[from_modules.layers[n].codes]) for n in ("1", "3"))


def test_write_is_atomic_and_a_failed_export_keeps_the_old_file(tmp_path, digits):
    model = _mlp().eval()
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match=r"`example_inputs` \(input: \(2, 3\) float32\) cannot go through the model"):
        export_onnx(model, target, torch.zeros(2, 3))  # wrong input size: refused before anything is exported
    assert target.read_bytes() == b"previous"
    export_onnx(model, target, digits[0][:2])
    assert onnx.load(target).graph.node and os.listdir(tmp_path) == ["m.onnx"]  # no temporary file left


def test_arguments_are_checked(tmp_path, digits):
    model, x = _mlp().eval(), digits[0][:2]
    with pytest.raises(ValueError, match=r"`activations` must be one of \['dynamic', 'static'\], got 'int8'"):
        export_onnx(model, tmp_path / "m.onnx", x, activations="int8")
    with pytest.raises(ValueError, match=r"`activations`='static' needs `calibration_data`"):
        export_onnx(model, tmp_path / "m.onnx", x, activations="static")
    with pytest.raises(ValueError, match=r"`opset` must be an integer in \[13, 20\], got 21"):
        export_onnx(model, tmp_path / "m.onnx", x, opset=21)
    with pytest.raises(TypeError, match=r"`example_input` must be a torch.Tensor, a tuple of tensors"):
        export_onnx(model, tmp_path / "m.onnx", example_input=x.numpy())
    result = quantize(_mlp(seed=1), bits=8)
    with pytest.raises(ValueError, match=r"`result` does not describe `model`: '1.weight'"):
        export_onnx(model, tmp_path / "m.onnx", x, result)


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-compress\[onnx\]'"):
        export_onnx(_mlp().eval(), tmp_path / "m.onnx", torch.zeros(2, 64))
    assert not (tmp_path / "m.onnx").exists()


def test_integer_op_set_is_what_the_check_uses():
    assert {"MatMulInteger", "ConvInteger", "QLinearConv", "MatMulNBits", "DynamicQuantizeMatMul"} <= INTEGER_OPS
    assert "DequantizeLinear" not in INTEGER_OPS and "Gemm" not in INTEGER_OPS
