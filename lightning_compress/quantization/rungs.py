"""Every selected layer at every bit width tried, made once and on demand from the saved float weights: the states
the metric fallback (:mod:`.fallback`) moves layers between. No Lightning import.

A width that the first pass did not make (a fallback rung: int4 -> int6 -> int8) is quantized the way the first pass
was: with GPTQ from the layer's input Hessian when one was kept (``method="gptq"``; the Hessian the first pass
measured, so no new forward; with ``GPTQConfig(sequential=True)`` that Hessian saw the earlier layers at their
first-pass widths, an approximation once they are promoted), else rounded to nearest. Before, every rung was
rounded to nearest, so an int3 GPTQ layer promoted to int4 lost GPTQ's gain with it: on all-MiniLM-L6-v2 (int3
g128, bound on held-out sentences) the first dozen promotions moved the metric by less than 0.01.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor, nn

from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.quantization.coverage import layer_weight
from lightning_compress.quantization.gptq import GPTQConfig, gptq_weight
from lightning_compress.quantization.layer import LayerQuantization, quantize_layer, record_layer
from lightning_compress.quantization.primitives import QuantSpec


class LayerRungs:
    """``(layer name, bits) -> LayerQuantization``, made when first asked for; :meth:`apply` puts the model in a
    plan's state (float, or quantized at the planned width, per layer).

    Args:
        layers: the selected modules, by name.
        floats: their float weights (copies, any device), the source of every quantization.
        specs: each layer's spec (its ``bits`` is replaced by the width asked for).
        hessians: per layer, the input Hessians GPTQ measured (see :func:`~.gptq.gptq_model`); a layer listed here
            is quantized at a new width with GPTQ and ``gptq``'s settings.
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        floats: Mapping[str, Tensor],
        specs: Mapping[str, QuantSpec],
        hessians: Mapping[str, list[Tensor]] | None = None,
        gptq: GPTQConfig | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.floats = floats
        self.specs = specs
        self.hessians = dict(hessians or {})
        self.gptq = gptq or GPTQConfig()
        self.made: dict[tuple[str, int], LayerQuantization] = {}

    def add(self, quantization: LayerQuantization) -> None:
        """Record a quantization made elsewhere (the first pass) as the layer's state at its width."""
        self.made[(quantization.module, quantization.bits)] = quantization

    def __getitem__(self, key: tuple[str, int]) -> LayerQuantization:
        if key not in self.made:
            name, bits = key
            module, spec = self.layers[name], replace(self.specs[name], bits=bits)
            weight = layer_weight(name, module)
            original = self.floats[name].to(weight.device)
            if name in self.hessians:
                qt = gptq_weight(original, self.hessians[name], spec, self.gptq, name)
                self.made[key] = record_layer(name, module, qt, "gptq", reference=original)
            else:
                with torch.no_grad():
                    weight.copy_(original)
                self.made[key] = quantize_layer(name, module, spec)
        return self.made[key]

    def apply(self, plan: Mapping[str, int]) -> None:
        """Every layer to the state ``plan`` says: its float weight (``FLOAT_BITS``) or quantized at that width."""
        for name, module in self.layers.items():
            bits = plan[name]
            value = self.floats[name] if bits == FLOAT_BITS else self[(name, bits)].qtensor.dequantize()
            weight = layer_weight(name, module)
            with torch.no_grad():
                weight.copy_(value.to(weight.device))

    def weights(self, name: str) -> int:
        """How many weights the layer holds (what a promotion's extra bytes scale with)."""
        return layer_weight(name, self.layers[name]).numel()
