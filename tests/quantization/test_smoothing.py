"""SmoothQuant-style smoothing: the scale formula, verified folds (pre-LN folds, post-LN residual refused), and the
int8 activation error with outlier channels."""

import copy

import pytest
import torch
from torch import nn

from lightning_compress.quantization.kernels import Int8Linear
from lightning_compress.quantization.primitives import QuantSpec, quantize_tensor
from lightning_compress.quantization.smoothing import SmoothedInt8Linear, smooth, smooth_int8, smoothing_scale


class PreLN(nn.Module):
    """x -> LayerNorm -> (q, k) and LayerNorm -> fc1 -> ReLU -> fc2; the residual is taken *before* the norm."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        with torch.no_grad():  # LayerNorm outlier channels, as in trained transformers
            self.norm.weight[:3] = 30.0

    def forward(self, x):
        h = self.norm(x)
        return x + self.q(h) * self.k(h).sigmoid() + self.fc2(torch.relu(self.fc1(h)))


class PostLN(PreLN):
    """The LayerNorm output is also the residual (BERT): folding 1/s into it would change the model."""

    def forward(self, x):
        h = self.norm(x)
        return h + self.q(h)


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 5, 32, generator=g) for _ in range(n)]


def test_smoothing_scale_by_hand():
    act, w = torch.tensor([4.0, 9.0, 0.0, 1.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    assert smoothing_scale(act, w, 0.5).tolist() == pytest.approx([2.0, 1.5, 1.0, 1.0])  # sqrt(a) / sqrt(w); 0 -> 1
    assert smoothing_scale(act, w, 1.0).tolist() == pytest.approx([4.0, 9.0, 1.0, 1.0])


def test_pre_ln_fold_keeps_the_function_and_shares_one_scale():
    torch.manual_seed(0)
    model = PreLN().eval()
    ref = copy.deepcopy(model)
    result = smooth(model, _data())
    assert sorted(result.consumers["norm"]) == ["fc1", "k", "q"]
    assert "fc2" in result.skipped  # after a ReLU: nothing to fold into
    x = _data(1, seed=5)[0]
    assert torch.allclose(model(x), ref(x), atol=1e-4)
    assert result.scales["norm"][:3].min() > result.scales["norm"][3:].max()  # the outlier channels shrink most


def test_post_ln_fold_is_refused_and_undone():
    torch.manual_seed(0)
    model = PostLN().eval()
    before = copy.deepcopy(model.state_dict())
    result = smooth(model, _data())
    assert not result.consumers and "changed the model's output" in result.skipped["q"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cls", [PreLN, PostLN])
def test_smooth_int8_beats_plain_int8_linear_on_outlier_channels(cls):
    torch.manual_seed(0)
    model = cls().eval()
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        reference = model(x)
    plain = copy.deepcopy(model)
    for name in ("q", "k", "fc1", "fc2"):
        layer = getattr(plain, name)
        setattr(plain, name, Int8Linear.from_quantized(layer, quantize_tensor(layer.weight, QuantSpec(bits=8))))
    smoothed = copy.deepcopy(model)
    result = smooth_int8(smoothed, _data())
    assert all(isinstance(getattr(smoothed, n), Int8Linear) for n in ("q", "k", "fc1", "fc2"))
    if cls is PostLN:
        assert isinstance(smoothed.q, SmoothedInt8Linear) and "q" in result.runtime  # scaled at run time instead
    with torch.no_grad():
        err_plain = (plain(x) - reference).square().mean()
        err_smooth = (smoothed(x) - reference).square().mean()
    assert err_smooth < 0.7 * err_plain


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 1.5}, ValueError, r"`alpha` must be a number in \[0.0, 1.0\], got 1.5"),
        ({"calibration_batches": 0}, ValueError, r"`calibration_batches` must be an integer in \[1, inf\], got 0"),
        ({"include": ["nothing"]}, ValueError, r"`smooth` needs a model with nn.Linear submodules"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        smooth(PreLN(), _data(1), **kwargs)
