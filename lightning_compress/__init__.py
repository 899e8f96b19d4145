"""lightning-compress: prune by gradient statistics and quantize to n-bit integers, inside a Lightning fit."""

from lightning_compress.pruning_callback import GradientStabilityPruning
from lightning_compress.selection import select_modules

__all__ = ["GradientStabilityPruning", "select_modules"]
__version__ = "0.1.0"
