"""safetensors export: exact reload, layout and sizes, atomic writes, refusals, int-kernel loading."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lightning_compress.quantization import Int8Linear, export, load_quantized, quantize, save_float, save_quantized
from lightning_compress.quantization.export import METADATA_KEY, read_metadata


class Net(nn.Module):
    """Conv + BatchNorm + Embedding + Linear layers, one of them without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(4, 8, 1)  # input size 4: every group size below divides it
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 8 * 8 + 8, 64)
        self.fc2 = nn.Linear(64, 10, bias=False)

    def forward(self, x, tokens):
        h = self.bn(self.conv(x)).relu().flatten(1)
        return self.fc2(self.fc1(torch.cat([h, self.emb(tokens)], dim=1)).relu())


def _trained_net():
    torch.manual_seed(0)
    net = Net()
    net.train()
    net(torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,)))  # non-trivial BatchNorm running stats
    return net.eval()


SCHEMES = {
    "int8-per-channel": {"bits": 8},
    "int8-asym-per-tensor": {"bits": 8, "symmetric": False, "granularity": "per_tensor"},
    "int4-group-asym-mse": {
        "bits": 4,
        "granularity": "per_group",
        "group_size": 4,
        "symmetric": False,
        "calibration": "mse",
    },
    "int3-per-channel-percentile": {"bits": 3, "calibration": "percentile"},
    "int2-group-fp16-scales": {"bits": 2, "granularity": "per_group", "group_size": 4, "scale_dtype": "float16"},
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_export_then_load_reproduces_the_quantized_model_exactly(tmp_path, scheme):
    model = _trained_net()
    result = quantize(model, module_types=["Linear", "Conv2d", "Embedding"], **SCHEMES[scheme])
    path = tmp_path / "model.safetensors"
    save_quantized(model, result, path)
    fresh = Net()
    load_quantized(fresh, path)
    fresh.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x, tokens = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    assert torch.equal(fresh(x, tokens), model(x, tokens))


def test_file_layout_metadata_and_packed_sizes(tmp_path):
    model = _trained_net()
    result = quantize(model, bits=4, granularity="per_group", group_size=8, symmetric=False, exclude=["conv"],
                      module_types=["Linear", "Conv2d"])
    path = tmp_path / "m.safetensors"
    save_quantized(model, result, path)
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        raw_meta = handle.metadata()[METADATA_KEY]
        qdata = handle.get_tensor("fc1.weight:qdata")
        scale = handle.get_tensor("fc1.weight:scale")
        zero = handle.get_tensor("fc1.weight:zero_point")
        bias = handle.get_tensor("fc1.bias")
    assert "fc1.weight" not in keys and "conv.weight" in keys and "bn.running_var" in keys
    assert qdata.dtype == torch.uint8 and qdata.numel() == 64 * 520 // 2  # two 4-bit codes per byte
    assert scale.shape == (64, 65) and scale.dtype == torch.float32
    assert zero.dtype == torch.uint8 and zero.numel() == 64 * 65 // 2
    assert bias.dtype == torch.float32 and torch.equal(bias, model.fc1.bias)
    meta = json.loads(raw_meta)
    assert meta == read_metadata(path)
    assert meta["layers"]["fc1.weight"]["bits"] == 4 and meta["layers"]["fc1.weight"]["shape"] == [64, 520]
    assert set(meta["layers"]) == {"fc1.weight", "fc2.weight"}


@pytest.mark.parametrize(("kwargs", "limit"), [({"bits": 8}, 0.27), ({"bits": 4, "granularity": "per_group"}, 0.15)])
def test_file_size_ratios_for_a_linear_heavy_model(tmp_path, kwargs, limit):
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 128))
    save_float(model, tmp_path / "fp32.safetensors")
    result = quantize(model, **kwargs)
    save_quantized(model, result, tmp_path / "q.safetensors")
    ratio = os.path.getsize(tmp_path / "q.safetensors") / os.path.getsize(tmp_path / "fp32.safetensors")
    assert ratio <= limit


def test_tied_weights_are_stored_once_as_an_alias(tmp_path):
    def make():
        m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
        m[1].weight = m[0].weight
        return m

    model = make()
    result = quantize(model, bits=4, module_types=["Embedding", "Linear"])
    save_quantized(model, result, tmp_path / "t.safetensors")
    assert read_metadata(tmp_path / "t.safetensors")["aliases"] == {"1.weight": "0.weight"}
    fresh = load_quantized(make(), tmp_path / "t.safetensors")
    assert torch.equal(fresh[1].weight, model[0].weight) and fresh[1].weight is fresh[0].weight


def test_atomic_write_leaves_the_previous_file_intact_on_failure(tmp_path, monkeypatch):
    model = _trained_net()
    result = quantize(model)
    path = tmp_path / "m.safetensors"
    save_quantized(model, result, path)
    original = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, quantize(model, bits=4), path)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind


def test_float_copy_is_a_plain_safetensors_state_dict(tmp_path):
    model = _trained_net()
    save_float(model, tmp_path / "f.safetensors")
    fresh = Net()
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(tmp_path / "f.safetensors"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="is not a lightning-compress quantized export"):
        load_quantized(Net(), tmp_path / "f.safetensors")


def test_loading_into_the_wrong_model_fails(tmp_path):
    model = _trained_net()
    save_quantized(model, quantize(model), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"m.safetensors', key '\w+\.\w+': is not in the model's state_dict"):
        load_quantized(nn.Sequential(nn.Linear(4, 4)), tmp_path / "m.safetensors")


def test_result_from_another_model_is_refused(tmp_path):
    result = quantize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"`result` has weights \['0.weight', '1.weight'\] that are not in the model"):
        save_quantized(_trained_net(), result, tmp_path / "m.safetensors")


def test_newer_format_version_is_refused(tmp_path, monkeypatch):
    model = _trained_net()
    monkeypatch.setattr(export, "VERSION", 99)
    save_quantized(model, quantize(model), tmp_path / "m.safetensors")
    monkeypatch.setattr(export, "VERSION", 1)
    with pytest.raises(ValueError, match="format version 99; this version reads <= 2"):
        load_quantized(Net(), tmp_path / "m.safetensors")


def test_load_with_int_kernels_swaps_eligible_linears(tmp_path, monkeypatch):
    from lightning_compress.quantization.kernels import POLICY_ENV

    monkeypatch.setenv(POLICY_ENV, "always")  # swap every eligible layer, whether or not int8 is faster on this CPU
    model = _trained_net()
    result = quantize(model, bits=8, module_types=["Linear", "Conv2d"])
    save_quantized(model, result, tmp_path / "m.safetensors")
    ints = load_quantized(Net(), tmp_path / "m.safetensors", int_kernels=True).eval()
    assert isinstance(ints.fc1, Int8Linear) and isinstance(ints.fc2, Int8Linear)
    assert isinstance(ints.conv, nn.Conv2d)  # convolutions stay dequantized float
    assert torch.equal(ints.fc1.dequantized_weight(), model.fc1.weight)
    x, tokens = torch.randn(32, 4, 8, 8), torch.randint(0, 10, (32,))
    ref, out = model(x, tokens), ints(x, tokens)
    # activation rounding (<= 1/254 of each row's max |x| per element) is the only extra error: well under 2%
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
    grouped_model = _trained_net()
    grouped = quantize(grouped_model, bits=4, granularity="per_group", group_size=8, exclude=["conv"])
    save_quantized(grouped_model, grouped, tmp_path / "g.safetensors")
    loaded = load_quantized(Net(), tmp_path / "g.safetensors", int_kernels=True)
    assert type(loaded.fc1) is nn.Linear  # per-group scales have no int8 form: left as float


def test_copy_of_quantized_model_still_exports(tmp_path):
    model = _trained_net()
    result = quantize(model, bits=4)
    clone = copy.deepcopy(model)
    save_quantized(clone, result, tmp_path / "m.safetensors")
    assert torch.equal(load_quantized(Net(), tmp_path / "m.safetensors").fc1.weight, clone.fc1.weight)


# ---------------------------------------------------------------------------- the codes a model carries (issue 19)
def test_load_quantized_attaches_the_codes_and_save_quantized_writes_them_back(tmp_path, monkeypatch):
    from lightning_compress.quantization.carried import carried
    from lightning_compress.quantization.kernels import POLICY_ENV

    model = _trained_net()
    save_quantized(model, quantize(model, bits=4, module_types=["Linear", "Conv2d"]), tmp_path / "m.safetensors")
    monkeypatch.setenv(POLICY_ENV, "never")  # int_kernels=True, but every layer keeps float (as a slow CPU would)
    loaded = load_quantized(Net(), tmp_path / "m.safetensors", int_kernels=True)
    record = carried(loaded)
    assert record is not None and record.source == f"load_quantized({str(tmp_path / 'm.safetensors')!r})"
    assert sorted(record.codes) == ["conv.weight", "fc1.weight", "fc2.weight"] and record.stale(loaded) == []
    save_quantized(loaded, tmp_path / "again.safetensors")  # no result: the carried codes
    again = load_quantized(Net(), tmp_path / "again.safetensors")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_save_quantized_without_result_refuses_a_float_or_changed_model(tmp_path):
    with pytest.raises(ValueError, match=r"`model` \(Net\) is not quantized: it carries no codes"):
        save_quantized(_trained_net(), tmp_path / "float.safetensors")
    model = _trained_net()
    save_quantized(model, quantize(model, bits=8), tmp_path / "m.safetensors")
    loaded = load_quantized(Net(), tmp_path / "m.safetensors")
    with torch.no_grad():
        loaded.fc1.weight.add_(0.5)  # trained or edited since loading
    with pytest.raises(ValueError, match=r"`model`'s weights \['fc1.weight'\] are no longer the codes load_quantized"):
        save_quantized(loaded, tmp_path / "stale.safetensors")
    assert not (tmp_path / "float.safetensors").exists() and not (tmp_path / "stale.safetensors").exists()
    with pytest.raises(TypeError, match="needs `path`"):
        save_quantized(loaded)
