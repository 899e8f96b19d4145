"""``quantize(model, ...)`` on plain nn.Modules: in-place replacement, selection, overrides, errors, real data."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.demos.data import MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.quantization import GPTQConfig, QuantSpec, quantize
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.gptq import gptq_weight
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
        ({"module_types": ["Embedding"]}, ValueError,
         r"nothing to quantize in ConvNet: .*`module_types`=\['Embedding'\]"),
        ({"include": ["nope"]}, ValueError, r"nothing to quantize in ConvNet: .*`include`=\['nope'\]"),
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


# ---------------------------------------------------------------------------------------------- issue 15 additions
class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(30, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.pos = nn.Parameter(torch.zeros(1, 6, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, ids):
        h = self.tok(ids) + self.pos
        a, _ = self.attn(h, h, h)
        return self.head(self.norm(h + a)).mean(1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_layer(bad):
    model = ConvNet()
    with torch.no_grad():
        model.fc1.weight[3, 7] = bad
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"cannot quantize non-finite weights: 'fc1' \(Linear.weight: "):
        quantize(model, bits=4)
    assert all(torch.equal(v, before[k]) or k == "fc1.weight" for k, v in model.state_dict().items())
    assert torch.equal(model.conv.weight, before["conv.weight"])  # nothing was quantized before the refusal


def test_whole_model_defaults_embeddings_8_bit_attention_and_float_report():
    model = TinyTransformer()
    result = quantize(model, bits=4)
    assert set(result.layers) == {"tok", "attn", "attn.out_proj", "head"}
    assert result.layers["tok"].bits == 8 and result.layers["attn"].bits == 4
    assert "normalization" in result.skipped["norm"] and "pos" in result.skipped[""]
    assert quantize(TinyTransformer(), bits=4, embedding_bits=6).layers["tok"].bits == 6
    explicit = quantize(TinyTransformer(), bits=4, module_types=["Embedding"])  # as before: the requested bits
    assert explicit.layers["tok"].bits == 4
    assert quantize(TinyTransformer(), bits=4, bits_overrides={"tok": 3}).layers["tok"].bits == 3
    legacy = quantize(TinyTransformer(), bits=4, module_types=["Linear"])  # the old default selection
    assert set(legacy.layers) == {"attn.out_proj", "head"} and "not selected" in legacy.skipped["tok"]


def test_default_selected_embedding_that_group_size_does_not_divide_stays_float():
    model = nn.Sequential(nn.Embedding(10, 12), nn.Linear(12, 16), nn.Linear(16, 4))
    result = quantize(model, bits=4, granularity="per_group", group_size=8, exclude=["1"])  # 12 % 8 != 0
    assert list(result.layers) == ["2"] and "does not divide" in result.skipped["0"]
    with pytest.raises(ValueError, match=r"layer '0' \(Embedding\): `group_size`=8 does not divide"):
        quantize(model, bits=4, granularity="per_group", group_size=8, module_types=["Embedding"])


def _guarded(model, x, max_drop, fallback):
    with torch.no_grad():
        target = model(x)

    def metric(m):  # negative output error vs the float model: 0 is perfect, higher is better
        with torch.no_grad():
            return -F.mse_loss(m(x), target).item() / target.var().item()

    return quantize(model, bits=2, metric_fn=metric, max_metric_drop=max_drop, fallback=fallback)


@pytest.mark.parametrize("fallback", ["more_bits", "float"])
def test_guarded_quantize_falls_back_until_the_bound_holds(fallback):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 16)
    result = _guarded(model, x, 0.02, fallback)
    assert result.metric_before == 0.0 and result.fallbacks
    assert result.metric_before - result.metric_after <= 0.02
    steps = [(s["from_bits"], s["to_bits"]) for s in result.fallbacks]
    if fallback == "more_bits":
        assert steps[0] == (2, 4)  # the first rung above 2 bits
    else:
        assert all(to == 32 for _, to in steps)
    kept_float = {s["layer"] for s in result.fallbacks if s["to_bits"] == 32}
    assert kept_float == {n for n, why in result.skipped.items() if "fallback" in why}
    assert all(layer.bits > 2 for n, layer in result.layers.items() if n in {s["layer"] for s in result.fallbacks})


def test_unguarded_metric_is_only_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    result = quantize(model, bits=8, metric_fn=lambda m: 1.0)
    assert (result.metric_before, result.metric_after, result.fallbacks) == (1.0, 1.0, [])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "awq"}, ValueError, r"`method` must be one of \['gptq', 'rtn'\], got 'awq'"),
        ({"method": "gptq"}, ValueError, r"`method`='gptq' needs `calibration_data`"),
        ({"max_metric_drop": 0.1}, ValueError, r"`max_metric_drop`=0.1 needs `metric_fn`"),
        ({"embedding_bits": 9}, ValueError, r"`embedding_bits` must be an integer in \[2, 8\], got 9"),
        ({"fallback": "int8"}, ValueError, r"`fallback` must be one of \['float', 'more_bits'\], got 'int8'"),
        ({"calibration_batches": 0}, ValueError, r"`calibration_batches` must be an integer in \[1, inf\], got 0"),
        ({"forward": "model(**batch)"}, TypeError, r"`forward` must be a callable"),
        ({"gptq": {"damp": 0.1}}, TypeError, r"`gptq` must be a GPTQConfig or None"),
    ],
)
def test_new_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(ConvNet(), **kwargs)


# ---------------------------------------------------------------------------- the model carries its codes (issue 19)
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_model_carries_the_codes_quantize_wrote(method):
    model = _mlp()
    kwargs = {"method": "gptq", "calibration_data": [torch.randn(32, 16)]} if method == "gptq" else {}
    result = quantize(model, bits=4, **kwargs)
    record = carried(model)
    assert record is not None and record.source == "quantize()"
    assert set(record.codes) == {"0.weight", "2.weight", "4.weight"}
    assert all(record.codes[layer.key] is layer.qtensor for layer in result.layers.values())
    assert record.stale(model) == []


def test_layers_that_fall_back_to_float_leave_the_record():
    model = _mlp()
    torch.manual_seed(1)
    result = _guarded(model, torch.randn(256, 16), 0.2, "float")
    kept_float = {f"{s['layer']}.weight" for s in result.fallbacks if s["to_bits"] == 32}
    record = carried(model)
    assert kept_float and record is not None
    assert set(record.codes) == {layer.key for layer in result.layers.values()}
    assert not kept_float & set(record.codes) and record.stale(model) == []


def test_the_default_arguments_warn_about_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(_mlp(), bits=8, metric_fn=lambda m: 1.0)


# ---------------------------------------------------------------------------- a bound no fallback meets
def test_a_bound_met_only_with_every_layer_float_warns_and_says_so():
    model = _mlp()
    with pytest.warns(UserWarning, match=r"quantize\(\): `max_metric_drop`=0.0 was met only with nothing quantized: "
                                         r"the best drop reached was 0, and every layer was left float"):
        result = _guarded(model, torch.randn(256, 16), 0.0, "float")
    assert result.bound_met is True and result.layers == {}
    assert carried(model) is None


def test_a_bound_never_met_warns_and_records_it():
    calls = []

    def drifting(model):  # the float model scores 1.0, every later measurement 0.5 (a metric that never recovers)
        calls.append(1)
        return 1.0 if len(calls) == 1 else 0.5

    with pytest.warns(UserWarning, match=r"`max_metric_drop`=0.1 was not met: the best drop reached was 0.5, and "
                                         r"every layer was left float"):
        result = quantize(_mlp(), bits=2, metric_fn=drifting, max_metric_drop=0.1, fallback="float")
    assert result.bound_met is False and result.metric_after == 0.5


def test_a_met_bound_is_recorded_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = quantize(_mlp(), bits=8, metric_fn=lambda m: 1.0, max_metric_drop=0.01)
    assert result.bound_met is True and result.fallbacks == []


# ---------------------------------------------------------------------------- nothing left half-quantized
def test_an_error_mid_way_restores_the_float_weights():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    calls = []

    def metric(m):  # fine for the float model and the first fallback states, then None
        calls.append(1)
        return 1.0 if len(calls) == 1 else (0.0 if len(calls) < 4 else None)

    with pytest.raises(ValueError, match=r"`metric_fn` must return a finite number .*returned None"):
        quantize(model, bits=2, metric_fn=metric, max_metric_drop=0.1)
    assert len(calls) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert carried(model) is None


def test_a_hessian_that_is_not_positive_definite_names_the_layer():
    spec = QuantSpec(bits=4)
    with pytest.raises(RuntimeError, match=r"layer 'blocks.0.fc': the layer's input Hessian is not positive definite"):
        gptq_weight(torch.randn(4, 6), [-torch.eye(6)], spec, GPTQConfig(), "blocks.0.fc")
    with pytest.raises(ValueError, match=r"layer 'fc': its input Hessian holds NaN"):
        gptq_weight(torch.randn(4, 6), [torch.full((6, 6), float("nan"))], spec, GPTQConfig(), "fc")
