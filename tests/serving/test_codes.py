"""export_onnx finds the codes a quantized model carries (itself or a submodule), refuses a stale record, never
guesses a float model quantized, and matches a ``result`` across one wrapper prefix."""

import os

import pytest
import torch
from torch import nn

from lightning_compress.core.io import UntrustedFileError
from lightning_compress.quantization import quantize
from lightning_compress.quantization.carried import attach, carried, forget
from lightning_compress.quantization.export import load_quantized_tensors, save_quantized
from lightning_compress.serving import export_onnx

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10)).eval()


class Wrapper(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, features):
        return self.net(features)


X = torch.randn(8, 32)


def _quantized(bits=8, **kwargs):
    model = _mlp()
    result = quantize(model, bits=bits, **kwargs)
    attach(model, {layer.key: layer.qtensor for layer in result.layers.values()}, "quantize()")  # as quantize() does
    return model, result


def test_a_quantized_model_exports_its_carried_codes_without_result(tmp_path):
    model, _ = _quantized()
    report = export_onnx(model, tmp_path / "m.onnx", X)
    assert set(report.layers) == {"0", "2"} and report.not_integer == {}
    assert "quantize()" in report.source and "float model" not in str(report)


def test_a_wrapper_finds_the_codes_its_submodule_carries(tmp_path):
    inner, _ = _quantized(bits=4, granularity="per_group", group_size=16)
    report = export_onnx(Wrapper(inner), tmp_path / "w.onnx", (X,))
    assert set(report.layers) == {"net.0", "net.2"} and report.inputs == ["features"]
    assert {layer.runtime_op for layer in report.layers.values()} == {"MatMulNBits"}
    assert report.source.startswith("net: ")


def test_a_stale_record_is_refused_naming_the_keys(tmp_path):
    model, _ = _quantized()
    with torch.no_grad():
        model[2].weight.add_(0.01)  # trained or edited after quantize()
    with pytest.raises(ValueError, match=r"`model` carries quantized codes \(quantize\(\)\) that no longer match its "
                                         r"weights: \['2.weight'\] changed since"):
        export_onnx(model, tmp_path / "m.onnx", X)
    with pytest.raises(ValueError, match=r"\['net.2.weight'\] changed since"):
        export_onnx(Wrapper(model), tmp_path / "m.onnx", X)
    assert os.listdir(tmp_path) == []


def test_a_model_carrying_nothing_is_float_even_when_its_weights_look_quantized(tmp_path):
    model, _ = _quantized(bits=4)  # weights on a 4-bit grid...
    forget(model)  # ...but no record: not guessed at
    assert carried(model) is None
    report = export_onnx(model, tmp_path / "f.onnx", X)
    assert report.layers == {} and report.source == ""
    assert "float model: nothing quantized" in str(report)


@pytest.mark.parametrize("direction", ["add prefix", "strip prefix"])
def test_result_keys_match_across_one_wrapper_prefix(tmp_path, direction):
    if direction == "add prefix":  # codes of the inner model, exported through the wrapper
        inner = _mlp()
        result = quantize(inner, bits=8)
        model, expected = Wrapper(inner), {"net.0", "net.2"}
    else:  # codes of the wrapper, exported on the inner model
        wrapper = Wrapper(_mlp())
        result = quantize(wrapper, bits=8)
        model, expected = wrapper.net, {"0", "2"}
    forget(model)
    forget(getattr(model, "net", model))
    report = export_onnx(model, tmp_path / "m.onnx", X, result)
    assert set(report.layers) == expected and report.source == "result" and report.not_integer == {}


def test_result_of_another_model_is_still_refused(tmp_path):
    result = quantize(nn.Sequential(nn.Linear(32, 48)), bits=8)
    with pytest.raises(ValueError, match=r"`result` does not describe `model`: '0.weight'"):
        export_onnx(_mlp(), tmp_path / "m.onnx", X, result)
    bad = {"encoder.layer.9.weight": next(iter(result.layers.values())).qtensor}
    with pytest.raises(ValueError, match=r"`result` has a weight 'encoder.layer.9.weight' that is not in the model's "
                                         r"state_dict \(also not after adding or removing a wrapper's prefix\)"):
        export_onnx(_mlp(), tmp_path / "m.onnx", X, bad)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("int_kernels", [False, True])
def test_a_model_loaded_by_load_quantized_exports_its_codes(tmp_path, monkeypatch, int_kernels):
    from lightning_compress.quantization import load_quantized, save_quantized

    monkeypatch.setenv("LIGHTNING_COMPRESS_INT8_KERNELS", "never")  # int_kernels=True keeps float: still quantized
    model, result = _quantized()
    save_quantized(model, result, tmp_path / "m.safetensors")
    loaded = load_quantized(_mlp(seed=3), tmp_path / "m.safetensors", int_kernels=int_kernels)
    report = export_onnx(loaded, tmp_path / "m.onnx", X)
    assert set(report.layers) == {"0", "2"} and report.not_integer == {}
    assert "load_quantized" in report.source


def test_an_outer_record_wins_over_an_older_inner_one(tmp_path):
    wrapper = Wrapper(_mlp())
    inner = quantize(wrapper.net, bits=8)
    attach(wrapper.net, {layer.key: layer.qtensor for layer in inner.layers.values()}, "quantize(net)")
    outer = quantize(wrapper, bits=4, granularity="per_group", group_size=16)  # the whole model, again
    attach(wrapper, {layer.key: layer.qtensor for layer in outer.layers.values()}, "quantize(wrapper)")
    assert carried(wrapper.net).stale(wrapper.net) == ["0.weight", "2.weight"]  # the inner record is out of date
    report = export_onnx(wrapper, tmp_path / "w.onnx", X)
    assert {layer.bits for layer in report.layers.values()} == {4} and report.not_integer == {}


WIDE = 65536  # a fully pruned Linear(WIDE, 64): its codes are its metadata alone, far beyond 1,024 positions per byte


class Pruned(nn.Module):
    def __init__(self, width=WIDE):
        super().__init__()
        self.wide, self.head = nn.Linear(width, 64, bias=False), nn.Linear(64, 4)
        with torch.no_grad():
            self.wide.weight.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.wide(x)))


def _pruned_file(tmp_path, module):
    quantize(module, bits=4)
    save_quantized(module, tmp_path / "pruned.safetensors")
    return tmp_path / "pruned.safetensors"


@pytest.mark.parametrize("keys", ["the model's", "a wrapper's", "a submodule's"])
def test_a_result_file_with_a_fully_pruned_layer_is_bounded_by_the_model_given(tmp_path, keys):
    """Read alone, the file is refused (nothing but its size bounds the shape it declares); with the model, whose
    shapes bound it (also across one wrapper prefix), its codes are exported exactly."""
    torch.manual_seed(0)
    model = Pruned().eval()
    saved = {"the model's": model, "a wrapper's": Wrapper(model), "a submodule's": model}[keys]
    path = _pruned_file(tmp_path, saved)
    with pytest.raises(UntrustedFileError, match="positions per byte of the file"):
        load_quantized_tensors(path)
    exported = Wrapper(model) if keys == "a submodule's" else model
    forget(model)
    x = torch.randn(2, WIDE)
    report = export_onnx(exported, tmp_path / "m.onnx", x, result=path)
    prefix = "net." if keys == "a submodule's" else ""
    assert set(report.layers) == {f"{prefix}wide", f"{prefix}head"} and report.source == "result"
    assert report.max_abs_diff < 1e-3 and report.not_integer == {}


def test_a_result_file_declaring_more_than_the_model_is_still_refused_before_reading(tmp_path):
    torch.manual_seed(0)
    path = _pruned_file(tmp_path, Pruned().eval())
    smaller = Pruned(width=WIDE // 2).eval()
    with pytest.raises(UntrustedFileError, match=r"'wide.weight': declared shape \[64, 65536\], the model has \[64, "
                                                 r"32768\]"):  # the model's shape is the bound, checked first
        export_onnx(smaller, tmp_path / "m.onnx", torch.randn(2, WIDE // 2), result=path)
    assert not (tmp_path / "m.onnx").exists()
