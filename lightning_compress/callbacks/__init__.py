"""The Lightning callbacks: thin coordinators of the Trainer's hooks. The only layer (with ``integration`` and
``reporting.publish``) that touches a ``Trainer``; every decision they take lives in a pure module."""

from lightning_compress.callbacks.pruning import GradientStabilityPruning
from lightning_compress.callbacks.qat import QuantizationAwareTraining
from lightning_compress.callbacks.quantization import PostTrainingQuantization

__all__ = ["GradientStabilityPruning", "PostTrainingQuantization", "QuantizationAwareTraining"]
