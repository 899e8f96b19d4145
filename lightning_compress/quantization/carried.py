"""What a quantized model in memory carries: its integer codes and where they came from.

:func:`~lightning_compress.quantize`, the quantization callback and :func:`~lightning_compress.load_quantized` write
dequantized float values into the model's weights. Without a record of the codes, a later
:func:`~lightning_compress.export_onnx` or ``save_quantized`` could not tell a quantized model from a float one and
would silently write float. :func:`attach` stores the codes on the model itself (a plain attribute: not in the
``state_dict``, copied by ``copy.deepcopy``), :func:`carried` reads them back, and :meth:`CarriedQuantization.stale`
says which weights no longer equal their dequantized codes (trained, restored to float or edited since). No
Lightning import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_compress.quantization.primitives import QuantizedTensor

ATTRIBUTE = "_lightning_compress_quantization"


@dataclass
class CarriedQuantization:
    """The codes of a quantized model, by ``state_dict`` key, and who produced them (e.g. ``"quantize()"``,
    ``"PostTrainingQuantization"``, ``"load_quantized('model.int4.safetensors')"``). ``activations``: trained uint8
    ranges ``(scale, zero point)`` of the layers' inputs, by the layer's weight key (QAT with ``activations="int8"``;
    ``export_onnx(activations="static")`` uses them instead of calibrating)."""

    codes: dict[str, QuantizedTensor] = field(default_factory=dict)
    source: str = ""
    activations: dict[str, tuple[float, int]] = field(default_factory=dict)

    def stale(self, model: nn.Module) -> list[str]:
        """Keys whose weight in ``model`` is missing, reshaped or not exactly the dequantized codes."""
        state = model.state_dict()
        changed = []
        for key, qt in self.codes.items():
            weight = state.get(key)
            if weight is None or tuple(weight.shape) != tuple(qt.shape):
                changed.append(key)
                continue
            expected = qt.dequantize().to(device=weight.device, dtype=weight.dtype)
            if not torch.equal(weight.detach(), expected):
                changed.append(key)
        return changed


def attach(model: nn.Module, codes: Mapping[str, QuantizedTensor], source: str) -> CarriedQuantization:
    """Record on ``model`` that its weights ``codes`` (state-dict key -> codes) are quantized; replaces any earlier
    record for the same keys and keeps the others (quantizing twice accumulates)."""
    record = carried(model) or CarriedQuantization(source=source)
    record.codes.update(codes)
    record.source = source if not record.source or record.source == source else f"{record.source}; {source}"
    object.__setattr__(model, ATTRIBUTE, record)
    return record


def carried(model: nn.Module) -> CarriedQuantization | None:
    """The quantization ``model`` carries, or None for a model that was never quantized (or was restored)."""
    record = model.__dict__.get(ATTRIBUTE)
    return record if isinstance(record, CarriedQuantization) and record.codes else None


def drop(model: nn.Module, keys: Iterable[str]) -> None:
    """Remove ``keys`` from the record (those weights went back to float, e.g. a metric fallback); the record goes
    when no key is left."""
    record = carried(model)
    if record is None:
        return
    for key in keys:
        record.codes.pop(key, None)
        record.activations.pop(key, None)
    if not record.codes:
        forget(model)


def forget(model: nn.Module) -> None:
    """Drop the record (the float weights were restored)."""
    model.__dict__.pop(ATTRIBUTE, None)
