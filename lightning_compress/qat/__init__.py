"""Quantization-aware training: LSQ fake quantization of the weights during the fit (:mod:`.fake_quant`), put on
and taken off a model (:mod:`.model`) with the exact codes it trained. No Lightning import; the callback is
:class:`lightning_compress.QuantizationAwareTraining`."""

from lightning_compress.qat.fake_quant import LSQFakeQuantizer
from lightning_compress.qat.model import convert, prepare, release

__all__ = ["LSQFakeQuantizer", "convert", "prepare", "release"]
