"""``quantize(model, ...)`` on plain nn.Modules: in-place replacement, selection, overrides, errors, real data."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.demos.data import MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.quantization import quantize
from lightning_compress.quantization.primitives import int_range


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.bn(self.conv(x)).flatten(1))))


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.c1 = nn.Conv1d(16, 8, 3)
        self.c3 = nn.Conv3d(2, 4, (1, 2, 2))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)


def _levels_per_row(weight):
    return max(len(torch.unique(row)) for row in weight.reshape(weight.shape[0], -1))


def test_weights_replaced_in_place_by_dequantized_values_biases_untouched():
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    params = {name: id(p) for name, p in model.named_parameters()}
    result = quantize(model, bits=4, granularity="per_channel")
    assert list(result.layers) == ["conv", "fc1", "fc2"]
    for name, layer in result.layers.items():
        weight = getattr(model, name).weight
        assert torch.equal(weight, layer.qtensor.dequantize())
        assert not torch.equal(weight, before[f"{name}.weight"])
        assert _levels_per_row(weight) <= 16
        assert torch.equal(getattr(model, name).bias, before[f"{name}.bias"])
        assert layer.sqnr_db > 15
    assert {name: id(p) for name, p in model.named_parameters()} == params  # same Parameter objects
    for key in ("bn.weight", "bn.bias", "bn.running_mean"):
        assert torch.equal(model.state_dict()[key], before[key])
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_conv1d_conv3d_embedding_rows_and_attention_projection():
    model = Zoo()
    types = ["Embedding", "Conv1d", "Conv3d", "torch.nn.MultiheadAttention"]
    result = quantize(model, bits=3, module_types=types)
    assert set(result.layers) == {"emb", "c1", "c3", "attn"}
    assert result.layers["attn"].key == "attn.in_proj_weight"
    assert result.layers["emb"].qtensor.scale.shape == (20, 1)  # one scale per embedding row
    for name, module in [("emb", model.emb), ("c1", model.c1), ("c3", model.c3)]:
        assert _levels_per_row(module.weight) <= 8, name
    assert _levels_per_row(model.attn.in_proj_weight) <= 8
    assert _levels_per_row(model.attn.out_proj.weight) > 8  # out_proj is a Linear: not selected here


def test_include_exclude_and_bits_overrides_first_match_wins():
    model = ConvNet()
    fc2 = model.fc2.weight.detach().clone()
    result = quantize(model, bits=4, exclude=["fc2"], bits_overrides={"^fc": 8, "conv": 2, "fc1": 3})
    assert {n: layer.bits for n, layer in result.layers.items()} == {"conv": 2, "fc1": 8}
    assert torch.equal(model.fc2.weight, fc2)
    result = quantize(ConvNet(), include=["^fc1$"])
    assert list(result.layers) == ["fc1"]


def test_tied_weight_quantized_once():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight
    result = quantize(model, bits=4, module_types=["Embedding", "Linear"])
    assert list(result.layers) == ["0"]
    assert "tied to '0'" in result.skipped["1"]
    assert model[1].weight is model[0].weight and _levels_per_row(model[0].weight) <= 16


@pytest.mark.parametrize("symmetric", [True, False])
def test_pruned_weights_stay_pruned(symmetric):
    model = ConvNet()
    with torch.no_grad():
        for module in (model.conv, model.fc1, model.fc2):
            module.weight[torch.rand_like(module.weight) < 0.6] = 0.0
    zeros = {n: getattr(model, n).weight == 0 for n in ("conv", "fc1", "fc2")}
    result = quantize(
        model,
        bits=2,
        granularity="per_group",
        group_size=8 if symmetric else 1,
        symmetric=symmetric,
        exclude=["conv"],
        calibration="mse",
    )
    for name, layer in result.layers.items():
        weight = getattr(model, name).weight
        assert bool((weight[zeros[name]] == 0).all())
        assert layer.sparsity >= zeros[name].float().mean().item()


def test_summary_is_json_friendly():
    import json

    result = quantize(ConvNet(), bits=4, granularity="per_group", group_size=4, calibration="mse", exclude=["conv"])
    summary = json.loads(json.dumps(result.summary()))
    assert summary["fc1"]["bits"] == 4 and summary["fc1"]["group_size"] == 4 and summary["fc1"]["shape"] == [32, 288]
    assert summary["fc1"]["nbytes"] == 32 * 288 // 2 + 32 * 72 * 4  # packed nibbles + one float32 scale per group


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"module_types": ["Embedding"]}, ValueError, r"nothing to quantize: .*`module_types`=\['Embedding'\]"),
        ({"include": ["nope"]}, ValueError, r"nothing to quantize: .*`include`=\['nope'\]"),
        (
            {"granularity": "per_group", "group_size": 16},
            ValueError,
            r"layer 'conv' \(Conv2d\): `group_size`=16 does not divide the input size 27.*\[9, 3, 1\]",
        ),
        ({"bits_overrides": {"fc": 9}}, ValueError, r"`bits_overrides\['fc'\]` must be an integer in \[2, 8\], got 9"),
        ({"bits_overrides": {"(": 4}}, ValueError, r"`bits_overrides` entry '\(' is not a valid regular expression"),
        ({"module_types": "Linear"}, TypeError, r"`module_types` must be a list of type names, got the string"),
        ({"module_types": ["Dense"]}, ValueError, r"`module_types` entry 'Dense' is not a known module type"),
        (
            {"module_types": ["torch.nn.BatchNorm2d"]},
            ValueError,
            r"selected 'bn' \(BatchNorm2d\) whose `weight` is not",
        ),
        ({"bits": 1}, ValueError, r"`bits` must be an integer in \[2, 8\], got 1"),
        ({"calibration": "kl"}, ValueError, r"`calibration` must be one of"),
    ],
)
def test_errors_name_argument_and_value(kwargs, error, match):
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        quantize(model, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-quantized


@pytest.fixture(scope="module")
def mnist_mlp():
    torch.manual_seed(0)
    dm = MNIST5kDataModule(batch_size=128, seed=0)
    dm.setup("fit")
    model = MLPClassifier(hidden=[256], lr=2e-3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(3):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), dm.test_dataloader()


@torch.no_grad()
def _accuracy(model, loader):
    return 100.0 * sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader) / len(loader.dataset)


@pytest.mark.slow
def test_real_mnist_int8_per_channel_loses_at_most_half_a_point(mnist_mlp):
    model, test = mnist_mlp
    base = _accuracy(model, test)
    assert base > 85.0
    q8 = copy.deepcopy(model)
    result = quantize(q8, bits=8)
    assert all(s > 35.0 for s in result.sqnr().values()), result.sqnr()
    assert base - _accuracy(q8, test) <= 0.5
    q4 = copy.deepcopy(model)
    quantize(q4, bits=4, granularity="per_group", group_size=16, calibration="mse")
    assert base - _accuracy(q4, test) <= 2.0


def test_int_range_used_for_codes():
    model = nn.Linear(64, 4)
    result = quantize(model, bits=3, symmetric=False)
    q = result.layers[""].qtensor.q
    low, high = int_range(3, False)
    assert q.dtype == torch.uint8 and int(q.min()) >= low and int(q.max()) <= high
