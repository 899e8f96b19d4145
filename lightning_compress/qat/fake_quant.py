"""LSQ fake quantization of one weight: symmetric n-bit codes with a learnable scale per channel / group. No Lightning.

:class:`LSQFakeQuantizer` is a ``torch.nn.utils.parametrize`` parametrization: registered on a module's weight, it
makes ``module.weight`` the dequantized codes of the latent float weight on every access, so the module's forward
(and the model's forward signature) are untouched. Per (row, group) of the weight's grouped view
(:func:`~lightning_compress.quantization.primitives.grouped_view`):

    w_hat = clamp(round(w * mask / s), -2^(b-1), 2^(b-1) - 1) * s

- **weights**: straight-through estimator for ``round`` (gradient 1), zero gradient outside the clipping range
  (LSQ, Esser et al. 2020);
- **scale**: ``s = s0 * exp(log_gain / (qmax * s0))``, ``s0`` the initial scale (a fixed buffer) and ``log_gain``
  the learnable parameter, 0 at the start (``s0 * exp(0)`` is ``s0`` exactly: training starts bit for bit at PTQ's
  model). Why this form: the fit's optimizer is usually Adam-type, which normalises the gradient, so a parameter
  moves by about the learning rate per step whatever its size. A linear scale then moved by ``lr`` per step, i.e.
  its clipping edge ``qmax * s`` by ``qmax * lr``, ``qmax`` times faster than the weights it quantizes; small int8
  steps were driven to the lower clamp and their rows died. Here a step of ``lr`` on ``log_gain`` moves the edge
  ``qmax * s`` by about ``lr`` (as a weight moves), and as a ratio of ``s``, so a scale stays positive and can
  never be stepped through zero;
- **scale gradient**: LSQ's, ``g = 1 / sqrt(group_len * qmax)`` times ``dL/ds``, carried over to ``log_gain`` as
  ``g * qmax**2 * dL/dlog_gain`` (``= g * qmax * dL/ds * s / s0``): an SGD step then moves ``s`` as LSQ's linear
  step would near ``s0`` (LSQ's tuning kept for SGD); for Adam the constant factor is normalised away;
- **initial scale**: the MSE calibration of post-training quantization
  (:func:`~lightning_compress.quantization.primitives.calibrate` with ``calibration="mse"`` and
  :func:`~lightning_compress.quantization.primitives.choose_qparams`), so training starts where PTQ ends;
- **pruning**: the keep-mask multiplies the weight before quantizing; zero maps to code 0 exactly (symmetric), so a
  pruned weight stays exactly zero in the forward, the gradient and the codes.

Both custom autograd functions return exact values in the forward (no ``x + (round(x) - x).detach()`` trick, which
can be one ulp off), so :meth:`LSQFakeQuantizer.codes` dequantizes to the very tensor the forward produced.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.quantization.primitives import (
    QuantizedTensor,
    QuantSpec,
    calibrate,
    choose_qparams,
    code_dtype,
    grouped_view,
    int_range,
)


class _RoundSTE(torch.autograd.Function):
    """``round`` in the forward, identity in the backward (straight-through)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward, the gradient times ``factor`` (a number, or a tensor broadcasting to ``x``) in the
    backward (LSQ's scale gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float | Tensor) -> Tensor:
        ctx.factor = factor.detach() if isinstance(factor, Tensor) else factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def lsq_grad_factor(group_len: int, bits: int) -> float:
    """LSQ's scale-gradient factor ``1 / sqrt(numel per scale * qmax)``."""
    return 1.0 / math.sqrt(group_len * int_range(bits, True)[1])


def initial_scale(weight: Tensor, spec: QuantSpec) -> Tensor:
    """The post-training MSE-calibrated symmetric scale of ``weight``, ``(rows, groups)`` float32."""
    mse = replace(spec, calibration="mse", symmetric=True, scale_dtype="float32")
    with torch.no_grad():
        groups = grouped_view(weight.detach(), mse.granularity, mse.group_size)
        lo, hi = calibrate(groups, mse)
        scale, _ = choose_qparams(lo, hi, mse)
    return scale.float()


class LSQFakeQuantizer(nn.Module):
    """The parametrization (see the module docstring). ``log_gain`` is an ``nn.Parameter`` shaped ``(rows,
    groups)``, ``base_scale`` (``s0``) a buffer of the same shape; ``mask`` (optional) is the pruning keep-mask,
    shaped like the weight. Both buffers are non-persistent: the callback's checkpoint state carries ``s0`` and
    ``log_gain`` (:func:`~lightning_compress.qat.model.plain_keys`)."""

    mask: Tensor | None
    base_scale: Tensor

    def __init__(self, weight: Tensor, spec: QuantSpec, mask: Tensor | None = None) -> None:
        super().__init__()
        if not spec.symmetric:
            raise ValueError(f"LSQ fake quantization is symmetric only, got `symmetric`={spec.symmetric!r}")
        self.spec = spec
        self.register_buffer("mask", None if mask is None else mask.to(weight.device, weight.dtype), persistent=False)
        base = initial_scale(self._masked(weight), spec).to(weight.device)
        self.register_buffer("base_scale", base, persistent=False)
        self.log_gain = nn.Parameter(torch.zeros_like(base))
        self.group_len = grouped_view(weight.detach(), spec.granularity, spec.group_size).shape[-1]
        self.grad_factor = lsq_grad_factor(self.group_len, spec.bits)

    @staticmethod
    def scale_shape(weight: Tensor, spec: QuantSpec) -> tuple[int, int]:
        """The ``(rows, groups)`` shape of the scale of ``weight`` under ``spec``."""
        rows, groups, _ = grouped_view(weight.detach(), spec.granularity, spec.group_size).shape
        return rows, groups

    @torch.no_grad()
    def load(self, base_scale: Tensor, log_gain: Tensor | None = None) -> None:
        """Resume: ``s0`` and ``log_gain`` as a checkpoint holds them (``log_gain`` None: 0, i.e. ``base_scale`` is
        the scale itself, as in checkpoints written before the scales were learned in log space)."""
        self.base_scale.copy_(base_scale.to(self.base_scale.device, torch.float32))
        self.log_gain.copy_(torch.zeros_like(self.log_gain) if log_gain is None else log_gain.to(self.log_gain))

    def effective_scale(self) -> Tensor:
        """The scale the forward and the codes use, ``s0 * exp(log_gain / (qmax * s0))``, kept positive and
        finite."""
        finfo, qmax = torch.finfo(torch.float32), int_range(self.spec.bits, True)[1]
        base = self.base_scale.clamp(min=finfo.tiny)
        gain = _ScaleGrad.apply(self.log_gain, self.grad_factor * qmax * qmax)
        return (base * torch.exp(gain / (qmax * base))).clamp(min=finfo.tiny, max=finfo.max)

    def _masked(self, weight: Tensor) -> Tensor:
        return weight if self.mask is None else weight * self.mask.to(weight.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        qmin, qmax = int_range(self.spec.bits, True)
        groups = grouped_view(self._masked(weight).float(), self.spec.granularity, self.spec.group_size)
        scale = self.effective_scale().unsqueeze(-1)
        codes = _RoundSTE.apply(torch.clamp(groups / scale, qmin, qmax))
        return (codes * scale).reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def codes(self, weight: Tensor) -> QuantizedTensor:
        """The exact integer codes and scales the forward applies to the latent ``weight``: their
        ``dequantize()`` equals ``forward(weight)`` bit for bit."""
        qmin, qmax = int_range(self.spec.bits, True)
        groups = grouped_view(self._masked(weight.detach()).float(), self.spec.granularity, self.spec.group_size)
        scale = self.effective_scale().detach().float().clone()
        q = torch.round(torch.clamp(groups / scale.unsqueeze(-1), qmin, qmax)).to(code_dtype(True))
        spec = replace(self.spec, symmetric=True, scale_dtype="float32")
        return QuantizedTensor(q.reshape(weight.shape), scale, None, spec, tuple(weight.shape), weight.dtype)
