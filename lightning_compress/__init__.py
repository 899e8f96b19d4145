"""lightning-compress: prune by gradient statistics and quantize to n-bit integers, inside a Lightning fit."""

from lightning_compress.adaptive import Budget, compress
from lightning_compress.callbacks.adaptive import AdaptiveCompression
from lightning_compress.callbacks.pruning import GradientStabilityPruning
from lightning_compress.callbacks.qat import QuantizationAwareTraining
from lightning_compress.callbacks.quantization import PostTrainingQuantization
from lightning_compress.core.selection import select_modules
from lightning_compress.integration.artifacts import load_compressed
from lightning_compress.quantization import load_quantized, quantize, save_quantized
from lightning_compress.serving import export_onnx
from lightning_compress.structure.compaction import compact, load_compacted, save_compacted

__all__ = [
    "AdaptiveCompression",
    "Budget",
    "GradientStabilityPruning",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "compact",
    "compress",
    "export_onnx",
    "load_compacted",
    "load_compressed",
    "load_quantized",
    "quantize",
    "save_compacted",
    "save_quantized",
    "select_modules",
]
__version__ = "0.1.0"
