"""Quantization math on plain tensors: range calibration, qparams, quantize / dequantize, SQNR. No Lightning.

A weight is viewed as ``(rows, groups, group_len)`` (``grouped_view``): dim 0 is the output channel (the row of
an Embedding), the other dims are flattened into the "input" dimension, and one (scale, zero point) pair is
chosen per ``(row, group)``:

- ``per_tensor``  -> ``(1, 1, numel)``
- ``per_channel`` -> ``(out, 1, in)``
- ``per_group``   -> ``(out, in // group_size, group_size)`` (``group_size`` must divide ``in``)

Integer codes are plain ``int8`` / ``uint8`` tensors (no ``torch.quantize_per_*``, no qint dtypes):

- symmetric: ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, ``w_hat = q * s`` with
  ``s = amax / ((2^b - 1) / 2)`` (torchao's ``choose_qparams_affine`` convention): ``+-amax`` sit at
  ``+-(2^(b-1) - 1/2)`` steps, so every value in ``[-amax, amax]`` is reconstructed within ``s / 2``, a finer step
  than the "restricted" ``amax / (2^(b-1) - 1)``; code ``-2^(b-1)`` is only reached at the ``-amax`` tie. Zero maps
  to code 0, so zero stays exactly zero.
- asymmetric (affine): ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w_hat = (q - z) * s`` with the range widened
  to contain 0 and the zero point ``z`` an *integer*, so ``0.0`` maps to ``z`` and back to exactly ``0.0``.

Calibration picks the range ``[lo, hi]`` per (row, group): ``minmax``; ``percentile`` (nearest-rank percentile of
``|w|``, or of both tails when asymmetric); ``mse`` (grid search over a clipping ratio ``r`` of the min/max range,
``r`` from 1 down to ``MSE_MIN_RATIO``, keeping per (row, group) the ``r`` with the smallest reconstruction error;
each grid step is one vectorised pass over the whole tensor). Rounding is round-to-nearest (ties to even).

Scales may be stored as float16: the scale is then rounded *up* to the next float16 before the codes are
computed, so the codes are exact for the stored scale and the ``s / 2`` bound still holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_compress.core.validation import check_choice, check_number

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
CALIBRATIONS = ("minmax", "percentile", "mse")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MSE_MIN_RATIO = 0.2  # smallest clipping ratio the MSE search tries (2-bit optima sit near 0.4-0.6)
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized. Checked on construction (errors name the argument, value and choices)."""

    bits: int = 8
    granularity: str = "per_channel"
    group_size: int = 128
    symmetric: bool = True
    calibration: str = "minmax"
    percentile: float = 99.9  # for calibration="percentile": percentile of |w| kept unclipped
    mse_grid: int = 80  # for calibration="mse": number of clipping ratios tried in [MSE_MIN_RATIO, 1]
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_number("bits", self.bits, low=2, high=8, integer=True)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_number("group_size", self.group_size, low=1, integer=True)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"`symmetric` must be True or False, got {self.symmetric!r}")
        check_choice("calibration", self.calibration, CALIBRATIONS)
        check_number("percentile", self.percentile, low=50, high=100, low_inclusive=False)
        check_number("mse_grid", self.mse_grid, low=2, high=1000, integer=True)
        check_choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code: signed for symmetric, unsigned for asymmetric."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def code_dtype(symmetric: bool) -> torch.dtype:
    return torch.int8 if symmetric else torch.uint8


def grouped_view(weight: Tensor, granularity: str, group_size: int) -> Tensor:
    """``weight`` as ``(rows, groups, group_len)``, sharing its storage when it is contiguous."""
    check_choice("granularity", granularity, GRANULARITIES)
    w = weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
    if granularity == "per_tensor":
        return w.reshape(1, 1, -1)
    if granularity == "per_channel":
        return w.unsqueeze(1)
    if w.shape[1] % group_size:
        raise ValueError(
            f"`group_size`={group_size} does not divide the input size {w.shape[1]} of a weight shaped "
            f"{tuple(weight.shape)}; allowed: a divisor of {w.shape[1]}, e.g. {divisors(w.shape[1], group_size)}"
        )
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)


def divisors(n: int, at_most: int) -> list[int]:
    """Up to four divisors of ``n`` no larger than ``at_most``, largest first (for error messages)."""
    found = [d for d in range(min(n, at_most), 0, -1) if n % d == 0]
    return found[:4]


def calibrate(groups: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Range ``(lo, hi)`` per (row, group), each shaped ``(rows, groups)``, in float32."""
    x = groups.float()
    if spec.calibration == "percentile":
        n = x.shape[-1]
        k_hi = min(n, max(1, math.ceil(spec.percentile / 100 * n)))
        if spec.symmetric:
            amax = x.abs().kthvalue(k_hi, dim=-1).values
            return -amax, amax
        k_lo = max(1, n + 1 - k_hi)
        return x.kthvalue(k_lo, dim=-1).values, x.kthvalue(k_hi, dim=-1).values
    lo, hi = torch.aminmax(x, dim=-1)
    if spec.calibration == "mse":
        from lightning_compress.quantization.calibration import mse_search  # calibration builds on this module

        return mse_search(x, lo, hi, spec)
    return lo, hi


def choose_qparams(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """Scale (``spec.scale_dtype``) and integer zero point (``uint8``, asymmetric only) per (row, group)."""
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    lo = lo.float().clamp(max=0.0)  # the range always contains 0, so 0 is representable exactly
    hi = hi.float().clamp(min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale; codes are 0
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    scale = _store_scale(scale, spec.scale_dtype)
    if spec.symmetric:
        return scale, None
    zero = torch.round(qmin - lo / scale.float()).clamp(qmin, qmax).to(torch.uint8)
    return scale, zero


def _store_scale(scale: Tensor, scale_dtype: str) -> Tensor:
    if scale_dtype == "float32" or bool((scale > _FP16_MAX).any()):
        return scale  # float16 would overflow: keep float32 (the dtype travels with the tensor)
    half = scale.to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < scale, up, half)  # round up: the clipping bound stays s/2


def quantize(x: Tensor, scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """Integer codes of ``x`` shaped ``(rows, groups, group_len)``; ``scale`` / ``zero`` shaped ``(rows, groups)``."""
    qmin, qmax = int_range(bits, symmetric)
    q = torch.round(x.float() / scale.float().unsqueeze(-1))
    if zero is not None:
        q += zero.float().unsqueeze(-1)
    return q.clamp_(qmin, qmax).to(code_dtype(symmetric))


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """Float32 reconstruction of codes ``(rows, groups, group_len)``. The one formula used in memory and on load."""
    values = q.float()
    if zero is not None:
        values = values - zero.float().unsqueeze(-1)
    return values * scale.float().unsqueeze(-1)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|w|^2 / |w - w_hat|^2)`` in dB (``inf`` when exact)."""
    ref = reference.detach().float()
    noise = (ref - approx.detach().float()).square_().sum().item()
    signal = ref.square().sum().item()
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


@dataclass
class QuantizedTensor:
    """Integer codes plus qparams of one weight. ``q`` has the weight's shape; ``scale`` / ``zero_point`` are
    ``(rows, groups)``. ``dequantize()`` is bit-identical wherever it runs (same formula, same inputs)."""

    q: Tensor
    scale: Tensor
    zero_point: Tensor | None
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: torch.dtype

    def dequantize(self) -> Tensor:
        codes = grouped_view(self.q, self.spec.granularity, self.spec.group_size)
        return dequantize(codes, self.scale, self.zero_point).reshape(self.shape).to(self.dtype)

    def int_weight(self) -> Tensor | None:
        """Codes minus zero point as ``int8`` when that is exact and the scale is one per row (int kernels)."""
        if self.spec.granularity == "per_group" or (self.zero_point is not None and self.spec.bits > 7):
            return None
        if self.zero_point is None:
            return self.q.to(torch.int8)
        codes = grouped_view(self.q, self.spec.granularity, self.spec.group_size).to(torch.int16)
        return (codes - self.zero_point.to(torch.int16).unsqueeze(-1)).to(torch.int8).reshape(self.shape)

    def row_scale(self) -> Tensor:
        """Float32 scale per output row (per_tensor / per_channel only)."""
        return self.scale.float().reshape(-1).expand(self.shape[0]).contiguous()


def quantize_tensor(weight: Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Calibrate, choose qparams and quantize ``weight`` (any shape with dim 0 = output channel)."""
    with torch.no_grad():
        groups = grouped_view(weight.detach(), spec.granularity, spec.group_size)
        lo, hi = calibrate(groups, spec)
        scale, zero = choose_qparams(lo, hi, spec)
        q = quantize(groups, scale, zero, spec.bits, spec.symmetric).reshape(weight.shape)
    return QuantizedTensor(q, scale, zero, spec, tuple(weight.shape), weight.dtype)
