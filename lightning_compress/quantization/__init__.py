"""Post-training weight quantization to 2..8-bit integers, in plain PyTorch (no Lightning import here).

- :mod:`.primitives`: qparams, quantize / dequantize, SQNR; :mod:`.calibration`: minmax / percentile / the fast
  MSE clipping search; :mod:`.packing`: n-bit codes packed densely into bytes (4-bit: two per byte).
- :mod:`.functional`: :func:`quantize` on any ``nn.Module`` (round to nearest or GPTQ, an optional metric guard with
  per-layer :mod:`.fallback`); :mod:`.coverage`: which layers are quantized by default and what stays float, why.
- :mod:`.gptq` / :mod:`.hessian`: data-aware rounding from the layers' input Hessians.
- :mod:`.smoothing`: SmoothQuant-style per-channel smoothing for int8 activations.
- :mod:`.export` / :mod:`.export_checks`: :func:`save_quantized` / :func:`load_quantized` (safetensors, JSON
  metadata, atomic write, every declared shape checked before reading).
- :mod:`.kernels`: :class:`Int8Linear`, an int8 x int8 -> int32 path for Linear layers, used where a self-test
  shows it is faster on this CPU.

The Lightning callback is :class:`lightning_compress.callbacks.quantization.PostTrainingQuantization`.
"""

from lightning_compress.quantization.coverage import QUANT_MODULE_TYPES
from lightning_compress.quantization.export import (
    check_same_run,
    load_float,
    load_quantized,
    save_float,
    save_quantized,
)
from lightning_compress.quantization.functional import LayerQuantization, QuantizationResult, quantize
from lightning_compress.quantization.gptq import GPTQConfig
from lightning_compress.quantization.kernels import Int8Linear
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec
from lightning_compress.quantization.smoothing import SmoothedInt8Linear, smooth, smooth_int8

__all__ = [
    "QUANT_MODULE_TYPES",
    "GPTQConfig",
    "Int8Linear",
    "LayerQuantization",
    "QuantSpec",
    "QuantizationResult",
    "QuantizedTensor",
    "SmoothedInt8Linear",
    "check_same_run",
    "load_float",
    "load_quantized",
    "quantize",
    "save_float",
    "save_quantized",
    "smooth",
    "smooth_int8",
]
