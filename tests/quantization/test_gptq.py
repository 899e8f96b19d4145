"""GPTQ against a by-hand reference, on correlated inputs vs round-to-nearest, zeros, Conv unfolding, export."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.quantization.export import load_quantized, save_quantized
from lightning_compress.quantization.functional import quantize
from lightning_compress.quantization.gptq import GPTQConfig, gptq_best, gptq_quantize, output_error
from lightning_compress.quantization.hessian import HessianAccumulator, layer_input_rows
from lightning_compress.quantization.primitives import QuantSpec, int_range, quantize_tensor


def _correlated_inputs(n=2048, d=48, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)


def _reference_gptq(W, X, bits, damp=0.01):
    """The paper's algorithm written out (OBQ order, float64, explicit inverse Hessian, no lazy batches): per
    column, round with the per-row min/max scale, spread the error with ``H^-1``, then remove the column from
    ``H^-1`` by one Gaussian-elimination step."""
    W = W.double().clone()
    H = 2 * X.double().T @ X.double() / X.shape[0]
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    qmin, qmax = int_range(bits, True)
    scale = (W.abs().amax(dim=1) / ((qmax - qmin) / 2)).float().double()
    codes = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q = torch.round(W[:, j] / scale).clamp(qmin, qmax)
        codes[:, j] = q
        err = (W[:, j] - q * scale) / Hinv[j, j]
        W[:, j:] -= err.unsqueeze(1) * Hinv[j, j:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return codes


def _output_error(W, W_hat, X):
    return ((X @ (W - W_hat).T) ** 2).mean().item()


def test_gptq_matches_the_by_hand_reference_and_beats_rtn_on_correlated_inputs():
    X = _correlated_inputs()
    W = torch.randn(24, 48)
    H = HessianAccumulator(48)
    for chunk in X.split(500):  # accumulated over batches: the same H
        H.add(chunk)
    spec = QuantSpec(bits=3)
    ours = gptq_quantize(W, H.hessian(), spec, act_order=False, block_size=16)
    reference = _reference_gptq(W, X, 3)
    agree = (ours.q.double() == reference).double().mean().item()
    assert agree > 0.97  # identical but for a few float32-vs-float64 rounding ties
    rtn = quantize_tensor(W, spec).dequantize()
    err_gptq, err_rtn = _output_error(W, ours.dequantize(), X), _output_error(W, rtn, X)
    ref_scale = ours.scale.double()
    err_ref = _output_error(W, (reference * ref_scale).float(), X)
    assert err_gptq <= 1.05 * err_ref
    assert err_gptq < 0.5 * err_rtn  # inputs with few directions: the error can be hidden in the null space


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=4, granularity="per_group", group_size=16), QuantSpec(bits=2, symmetric=False, calibration="mse",
                                                                       granularity="per_group", group_size=8)],
    ids=["4b-g16-sym", "2b-g8-asym-mse"],
)
def test_per_group_and_act_order_beat_rtn_and_keep_zeros(spec, act_order):
    X = _correlated_inputs(seed=1)
    W = torch.randn(32, 48)
    W[torch.rand_like(W) < 0.4] = 0.0
    acc = HessianAccumulator(48)
    acc.add(X)
    qt = gptq_quantize(W, acc.hessian(), spec, act_order=act_order)
    deq = qt.dequantize()
    assert bool((deq[W == 0] == 0).all())  # pruned weights stay exactly zero
    assert qt.scale.shape == (32, 48 // spec.group_size)
    assert _output_error(W, deq, X) < _output_error(W, quantize_tensor(W, spec).dequantize(), X)


def test_lazy_blocks_do_not_change_the_result():
    X = _correlated_inputs(seed=2)
    W = torch.randn(16, 48)
    acc = HessianAccumulator(48)
    acc.add(X)
    spec = QuantSpec(bits=4, granularity="per_group", group_size=12)
    one = gptq_quantize(W, acc.hessian(), spec, block_size=1, act_order=False)
    many = gptq_quantize(W, acc.hessian(), spec, block_size=20, act_order=False)  # blocks straddle groups
    assert (one.q == many.q).float().mean() > 0.99


def test_conv_unfolding_matches_the_convolution():
    torch.manual_seed(0)
    for conv, x in [
        (nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1), torch.randn(2, 3, 9, 9)),
        (nn.Conv1d(4, 6, 3, padding=2, dilation=2), torch.randn(2, 4, 11)),
    ]:
        rows = layer_input_rows(conv, x)
        out = conv(x) - conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
        expected = out.movedim(1, -1).reshape(-1, conv.out_channels)
        assert torch.allclose(rows @ conv.weight.reshape(conv.out_channels, -1).T, expected, atol=1e-5)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 8)

    def forward(self, ids, memory=None):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        kv = h if memory is None else memory
        a, _ = self.attn(h, kv, kv)
        return self.head(self.norm(h + a))


def _batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"ids": torch.randint(0, 40, (4, 10), generator=g)} for _ in range(n)]


def test_quantize_gptq_on_a_model_exports_and_loads_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    result = quantize(model, bits=4, granularity="per_group", group_size=16, method="gptq",
                      calibration_data=_batches())
    methods = {name: layer.method for name, layer in result.layers.items()}
    assert methods == {"emb": "rtn", "conv": "gptq", "attn": "gptq", "attn.out_proj": "rtn", "head": "gptq"}
    assert "Embedding" in result.notes["emb"] and "not called" in result.notes["attn.out_proj"]
    assert result.layers["emb"].bits == 8  # embeddings: 8-bit unless asked otherwise
    path = tmp_path / "gptq.safetensors"
    save_quantized(model, result, path)
    torch.manual_seed(1)
    loaded = load_quantized(_Net(), path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for name, layer in result.layers.items():
        assert torch.equal(layer.qtensor.dequantize(), model.get_submodule(name).state_dict()[layer.attr])


def test_gptq_lowers_the_model_output_error_versus_rtn():
    torch.manual_seed(0)
    model = _Net().eval()
    calib, test = _batches(8, seed=0), _batches(4, seed=1)
    with torch.no_grad():
        reference = [model(**b) for b in test]

    def output_error(m):
        with torch.no_grad():
            return sum(F.mse_loss(m(**b), r).item() for b, r in zip(test, reference))

    kwargs = {"bits": 3, "granularity": "per_group", "group_size": 16, "module_types": ["Linear", "Conv1d"]}
    rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
    quantize(rtn, **kwargs)
    quantize(gptq, method="gptq", calibration_data=calib, **kwargs)
    assert output_error(gptq) < output_error(rtn)


def test_cross_attention_gets_one_hessian_per_projection_and_custom_forward():
    torch.manual_seed(0)
    model = _Net().eval()
    memory = torch.randn(4, 7, 32)
    calib = [(b["ids"], memory) for b in _batches(4)]
    types = ["torch.nn.MultiheadAttention"]
    result = quantize(model, bits=4, method="gptq", calibration_data=calib, module_types=types,
                      forward=lambda m, batch: m(batch[0], memory=batch[1]))
    assert result.layers["attn"].method == "gptq" and result.layers["attn"].qtensor.scale.shape == (96, 1)


def test_sequential_and_one_pass_configs_and_validation():
    model = _Net().eval()
    result = quantize(copy.deepcopy(model), bits=4, method="gptq", calibration_data=_batches(2),
                      gptq=GPTQConfig(sequential=False, damp=0.1, block_size=8))
    assert result.layers["head"].method == "gptq"
    with pytest.raises(ValueError, match=r"`damp` must be a number in \[0.0, 1.0\], got 2"):
        GPTQConfig(damp=2)
    with pytest.raises(TypeError, match=r"`act_order` must be True or False, got 'yes'"):
        GPTQConfig(act_order="yes")
    with pytest.raises(TypeError, match=r"`try_unclipped` must be True or False, got 1"):
        GPTQConfig(try_unclipped=1)
    with pytest.raises(ValueError, match=r"`hessian` must be \(8, 8\)"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7), QuantSpec())


def test_clip_powers_keep_the_lowest_output_error():
    """Several H-weighted clipping searches (inputs with outlier columns): the kept run's output error is the lowest
    of them, so never above the plain search's (power 0); the default (power 0 only) is plain GPTQ."""
    g = torch.Generator().manual_seed(3)
    X = _correlated_inputs(d=64, seed=3) * torch.where(torch.arange(64) % 16 == 0, 20.0, 1.0)  # outlier columns
    W = torch.randn(32, 64, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    spec = QuantSpec(bits=3, granularity="per_group", group_size=32, symmetric=False, calibration="mse")
    errors = {p: output_error(W, gptq_quantize(W, H, spec, damp=0.1, clip_power=p), H) for p in (0.0, 0.5, 1.0)}
    best = gptq_best(W, H, spec, GPTQConfig(damp=0.1, clip_powers=(0.0, 0.5, 1.0)))
    assert output_error(W, best, H) == pytest.approx(min(errors.values()), rel=1e-6)
    assert output_error(W, best, H) <= errors[0.0]
    plain = gptq_best(W, H, spec, GPTQConfig(damp=0.1))
    torch.testing.assert_close(plain.q, gptq_quantize(W, H, spec, damp=0.1).q)
    with pytest.raises(TypeError, match="`clip_powers` must be a non-empty tuple"):
        GPTQConfig(clip_powers=())
    with pytest.raises(ValueError, match=r"`clip_powers\[\]` must be a number in \[0.0, 2.0\]"):
        GPTQConfig(clip_powers=(0.0, 3.0))


def test_quantize_reports_progress_per_gptq_layer_and_refuses_a_bad_hook():
    calls = []
    result = quantize(_Net().eval(), bits=4, method="gptq", calibration_data=_batches(2),
                      progress=lambda done, total, name: calls.append((done, total, name)))
    gptq_layers = [name for name, layer in result.layers.items() if layer.method == "gptq"]
    assert [c[0] for c in calls] == list(range(1, len(gptq_layers) + 1))
    assert {c[1] for c in calls} == {len(gptq_layers)} and sorted(c[2] for c in calls) == sorted(gptq_layers)
    with pytest.raises(TypeError, match=r"`progress` must be a callable \(done, total, layer_name\) or None, got 3"):
        quantize(_Net().eval(), bits=4, method="gptq", calibration_data=_batches(1), progress=3)


def test_the_unclipped_range_is_a_candidate_so_mse_clipping_never_raises_the_output_error():
    """A few large weights meeting large inputs: MSE clipping (best for the weights) clips them and the output pays;
    with ``try_unclipped`` the min/max run is kept when its output error is lower (and the spec says so)."""
    g = torch.Generator().manual_seed(5)
    X = _correlated_inputs(d=64, seed=5) * torch.where(torch.arange(64) < 4, 30.0, 1.0)
    W = torch.randn(32, 64, generator=g) * 0.1
    W[:, :4] += torch.randn(32, 4, generator=g)  # the large weights sit on the large inputs
    H = 2 * X.T @ X / X.shape[0]
    spec = QuantSpec(bits=3, symmetric=False, calibration="mse")
    errors = {c: output_error(W, gptq_quantize(W, H, replace(spec, calibration=c), damp=0.1), H)
              for c in ("mse", "minmax")}
    best = gptq_best(W, H, spec, GPTQConfig(damp=0.1))
    assert output_error(W, best, H) == pytest.approx(min(errors.values()), rel=1e-6)
    assert errors["minmax"] < errors["mse"] and best.spec.calibration == "minmax"  # the case this guards against
    only_mse = gptq_best(W, H, spec, GPTQConfig(damp=0.1, try_unclipped=False))
    assert only_mse.spec.calibration == "mse"
    assert output_error(W, only_mse, H) == pytest.approx(errors["mse"], rel=1e-6)
