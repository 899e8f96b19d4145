"""prepare / release / convert on a whole model, and checkpoints with the model's own keys."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize

from lightning_compress.qat.model import convert, latent, plain_keys, prepare, release
from lightning_compress.quantization import load_quantized, save_quantized
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.coverage import plan_layers
from lightning_compress.quantization.packing import unpack
from lightning_compress.quantization.primitives import QuantSpec


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def _plan(model: nn.Module, bits: int = 3):
    return plan_layers(model, QuantSpec(bits=bits, calibration="mse"), None, None, None, None, None)


def _train(model: nn.Module, steps: int = 5) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(16, 1, 8, 8)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_prepare_keeps_the_parameter_objects_and_changes_the_forward() -> None:
    model = _model()
    params = {id(model[0].weight), id(model[3].weight), id(model[5].weight)}
    x = torch.randn(2, 1, 8, 8)
    float_out = model(x).detach()
    quantizers = prepare(model, _plan(model))
    assert set(quantizers) == {"0", "3", "5"}
    assert {id(latent(model[i])) for i in (0, 3, 5)} == params  # an optimizer built before still trains them
    assert not torch.allclose(model(x), float_out)


def test_convert_delivers_the_trained_forward_and_an_export_with_the_same_codes(tmp_path) -> None:
    model = _model()
    quantizers = prepare(model, _plan(model))
    _train(model)
    x = torch.randn(4, 1, 8, 8)
    trained = model(x).detach()
    result = convert(model, quantizers)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert torch.equal(model(x), trained)  # nothing re-rounded
    assert {layer.method for layer in result.layers.values()} == {"qat"}
    record = carried(model)
    assert record is not None and record.stale(model) == []
    path = tmp_path / "m.safetensors"
    save_quantized(model, path=path)  # from the carried codes, no result needed
    with safe_open(str(path), framework="pt") as handle:
        for name, layer in result.layers.items():
            qt = layer.qtensor
            codes = unpack(handle.get_tensor(f"{layer.key}:qdata"), 3, qt.q.numel(), signed=True)
            assert torch.equal(codes.reshape(qt.shape), qt.q), name
            assert torch.equal(handle.get_tensor(f"{layer.key}:scale"), qt.scale), name
    fresh = _model()
    load_quantized(fresh, path)
    assert torch.equal(fresh(x), trained)


def test_release_leaves_the_latent_float_weights() -> None:
    model = _model()
    quantizers = prepare(model, _plan(model))
    _train(model)
    latents = {i: latent(model[i]).detach().clone() for i in (0, 3, 5)}
    codes = release(model, quantizers)
    for i in (0, 3, 5):
        assert torch.equal(model[i].weight, latents[i])
        assert not torch.equal(model[i].weight, codes[str(i)].dequantize())


def test_masks_keep_pruned_weights_zero_through_training() -> None:
    model = _model()
    keep = torch.rand_like(model[3].weight) > 0.5
    with torch.no_grad():
        model[3].weight.mul_(keep)
    quantizers = prepare(model, _plan(model), {"3.weight": keep})
    _train(model)
    assert bool((model[3].weight[~keep] == 0).all())  # the forward's weight
    result = convert(model, quantizers)
    assert bool((result.layers["3"].qtensor.q[~keep] == 0).all())
    assert bool((model[3].weight[~keep] == 0).all())


def test_plain_keys_load_into_a_plain_model_and_resume_the_scales() -> None:
    model = _model()
    quantizers = prepare(model, _plan(model))
    _train(model)
    assert all(bool(q.log_gain.any()) for q in quantizers.values())  # the scales trained
    x = torch.randn(2, 1, 8, 8)
    out = model(x).detach()
    state = model.state_dict()
    plain_keys(state, model, ["0", "3", "5"])
    assert not any("parametrizations" in key for key in state)
    scales = {f"{n}.weight": q.base_scale for n, q in quantizers.items()}
    gains = {f"{n}.weight": q.log_gain.detach() for n, q in quantizers.items()}
    fresh = _model()
    fresh.load_state_dict(state, strict=True)
    prepare(fresh, _plan(fresh), scales=scales, gains=gains)
    assert torch.equal(fresh(x), out)


def test_prepare_refuses_a_scale_of_another_shape_and_a_parametrized_weight_before_changing_anything() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"scale for '3.weight' is shaped \(8, 2\), the layer needs \(8, 1\)"):
        prepare(model, _plan(model), scales={"3.weight": torch.ones(8, 2)})
    with pytest.raises(ValueError, match=r"log gain for '3.weight' is shaped \(1, 1\), the layer needs \(8, 1\)"):
        prepare(model, _plan(model), scales={"3.weight": torch.ones(8, 1)}, gains={"3.weight": torch.ones(1, 1)})
    with pytest.raises(ValueError, match=r"log gain for '3.weight' without its base scale"):
        prepare(model, _plan(model), gains={"3.weight": torch.ones(8, 1)})
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    plan = _plan(model)
    prepare(model, plan)
    with pytest.raises(ValueError, match="already parametrized"):
        prepare(model, plan)


def test_export_onnx_takes_the_trained_codes_as_they_are(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from lightning_compress.serving import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
    quantizers = prepare(model, _plan(model, bits=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 32)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    result = convert(model.eval(), quantizers)
    report = export_onnx(model, tmp_path / "m.onnx", x)
    assert "QAT" in report.source and report.not_integer == {} and set(report.layers) == {"0", "2"}
    graph = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    for name, layer in result.layers.items():  # (in, out) int8 codes and one scale per output, as trained
        assert torch.equal(torch.from_numpy(graph[f"{name}.weight_quantized"]).T, layer.qtensor.q), name
        assert torch.equal(torch.from_numpy(graph[f"{name}.weight_scale"]), layer.qtensor.scale.reshape(-1)), name


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1)
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)).mean(1))


def test_a_transformer_is_covered_whole_and_delivered_as_trained() -> None:
    torch.manual_seed(0)
    model = _Encoder()
    quantizers = prepare(model, _plan(model, bits=4))
    assert set(quantizers) == {"emb", "enc.layers.0.self_attn", "enc.layers.0.self_attn.out_proj",
                               "enc.layers.0.linear1", "enc.layers.0.linear2", "head"}
    assert quantizers["emb"].spec.bits == 8 and quantizers["head"].spec.bits == 4  # quantize()'s defaults
    ids = torch.randint(0, 50, (4, 7))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids).square().mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(ids)
    result = convert(model, quantizers)
    assert result.layers["enc.layers.0.self_attn"].key == "enc.layers.0.self_attn.in_proj_weight"
    with torch.no_grad():
        assert torch.equal(model(ids), trained)
