"""LayerRungs: each (layer, width) made once from the float weights; GPTQ at a new width where a Hessian was kept;
`quantize()`'s metric fallback promotes GPTQ layers to GPTQ rungs, cheapest bound first."""

import copy

import torch
from torch import nn

from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.quantization.functional import quantize
from lightning_compress.quantization.gptq import GPTQConfig, output_error
from lightning_compress.quantization.primitives import QuantSpec
from lightning_compress.quantization.rungs import LayerRungs


def _correlated(n=1024, d=32, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)


def _two_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
    floats = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "1")}
    return {n: model.get_submodule(n) for n in ("0", "1")}, floats


def test_a_new_width_is_gptq_from_the_kept_hessian_and_beats_rounding_to_nearest():
    layers, floats = _two_layers()
    X = _correlated()
    H = 2 * X.T @ X / X.shape[0]
    specs = {n: QuantSpec(bits=3) for n in layers}
    with_h = LayerRungs(layers, floats, specs, hessians={"0": [H]})
    without = LayerRungs(layers, floats, specs)
    gptq4, rtn4 = with_h[("0", 4)], without[("0", 4)]
    assert gptq4.method == "gptq" and rtn4.method == "rtn" and gptq4.bits == rtn4.bits == 4
    assert output_error(floats["0"], gptq4.qtensor, H) < output_error(floats["0"], rtn4.qtensor, H)
    assert with_h[("0", 4)] is gptq4  # made once
    assert with_h[("1", 4)].method == "rtn"  # no Hessian kept for it


def test_apply_puts_each_layer_in_its_planned_state_and_float_back_exactly():
    layers, floats = _two_layers()
    states = LayerRungs(layers, floats, {n: QuantSpec(bits=4) for n in layers})
    states.apply({"0": 2, "1": 8})
    assert torch.equal(layers["0"].weight, states[("0", 2)].qtensor.dequantize())
    assert torch.equal(layers["1"].weight, states[("1", 8)].qtensor.dequantize())
    assert not torch.equal(layers["0"].weight, floats["0"])
    states.apply({"0": FLOAT_BITS, "1": FLOAT_BITS})
    assert all(torch.equal(layers[n].weight, floats[n]) for n in layers)
    assert states.weights("0") == 32 * 32


class _Wide(nn.Module):
    """A small layer that matters and a wide one that matters a little more in total but far less per weight."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Linear(16, 4)
        self.wide = nn.Linear(16, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.small(x) * 4.0, self.wide(x)], dim=-1)


def test_quantize_fallback_promotes_gptq_layers_to_gptq_rungs_cheapest_per_weight_first():
    torch.manual_seed(0)
    model = _Wide().eval()
    data = [_correlated(64, 16, seed=s) for s in range(4)]
    test = _correlated(256, 16, seed=9)
    with torch.no_grad():
        reference = model(test)

    def metric(m: nn.Module) -> float:
        with torch.no_grad():
            return -float(((m(test) - reference) ** 2).mean())

    plain = quantize(copy.deepcopy(model), bits=2, method="gptq", calibration_data=data, gptq=GPTQConfig(damp=0.1),
                     metric_fn=metric)
    bound = -plain.metric_after * 0.5  # half the all-int2 error: some layer must climb
    result = quantize(model, bits=2, method="gptq", calibration_data=data, gptq=GPTQConfig(damp=0.1),
                      metric_fn=metric, max_metric_drop=bound)
    assert result.fallbacks, "the bound should need a fallback"
    assert [f["layer"] for f in result.fallbacks[:2]] == ["small", "wide"]
    small, wide = result.fallbacks[0]["sensitivity"], result.fallbacks[1]["sensitivity"]
    assert small < wide and small / 64 > wide / 4096  # by sensitivity alone "wide" would have gone first
    assert "per weight" in result.fallbacks[0]["reason"]
    assert all(result.layers[n].method == "gptq" for n in result.layers)  # the promoted width is GPTQ too
    assert -result.metric_after <= bound
