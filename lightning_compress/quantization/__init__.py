"""Post-training weight quantization to 2..8-bit integers, in plain PyTorch (no Lightning import here).

- :mod:`.math`: qparams, calibration (minmax / percentile / mse), quantize / dequantize, SQNR.
- :mod:`.packing`: n-bit codes packed densely into bytes (4-bit: two per byte).
- :mod:`.functional`: :func:`quantize` on any ``nn.Module``; weights replaced in place by their dequantized values.
- :mod:`.export`: :func:`save_quantized` / :func:`load_quantized` (safetensors, JSON metadata, atomic write).
- :mod:`.int_linear`: :class:`Int8Linear`, an int8 x int8 -> int32 inference path for Linear layers.

The Lightning callback is :class:`lightning_compress.callbacks.quantization.PostTrainingQuantization`.
"""

from lightning_compress.quantization.export import load_quantized, save_float, save_quantized
from lightning_compress.quantization.functional import LayerQuantization, QuantizationResult, quantize
from lightning_compress.quantization.kernels import Int8Linear
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec

__all__ = [
    "Int8Linear",
    "LayerQuantization",
    "QuantSpec",
    "QuantizationResult",
    "QuantizedTensor",
    "load_quantized",
    "quantize",
    "save_float",
    "save_quantized",
]
