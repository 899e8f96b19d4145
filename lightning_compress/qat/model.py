"""Quantization-aware training of a whole model: put LSQ fake quantizers on the selected weights, and take them off
again leaving the exact codes they trained. No Lightning.

- :func:`prepare` registers one :class:`~.fake_quant.LSQFakeQuantizer` per selected weight through
  ``torch.nn.utils.parametrize`` (the layers chosen by :func:`~lightning_compress.quantization.coverage.plan_layers`,
  the same coverage as :func:`~lightning_compress.quantize`). The latent float weight stays the *same*
  ``nn.Parameter`` object (``parametrizations.<attr>.original``), so an optimizer built before keeps training it
  and pruning masks bound to it keep applying.
- :func:`release` reads every layer's codes, removes the parametrizations and leaves the latent float weights
  (masked) in place: the way back to float, and what a metric gate compares against.
- :func:`convert` is :func:`release` followed by writing the dequantized codes into the weights (nothing
  re-rounded: the same codes), returning a :class:`~lightning_compress.quantization.functional.QuantizationResult`
  and attaching the codes to the model (:mod:`~lightning_compress.quantization.carried`), so ``save_quantized``,
  ``export_onnx`` and the report take them as they take ``quantize()``'s.
- :func:`plain_keys` turns a parametrized ``state_dict`` back into the model's own keys (the latent weight under
  ``<name>.weight``), the scales left to the callback's state: checkpoints stay loadable into a plain model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.qat.fake_quant import LSQFakeQuantizer
from lightning_compress.quantization.carried import attach
from lightning_compress.quantization.coverage import LayerPlan, float_leftovers, weight_key, weight_name
from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.quantization.layer import LayerQuantization, record_layer
from lightning_compress.quantization.primitives import QuantizedTensor

METHOD = "qat"  # LayerQuantization.method of a layer whose codes QAT trained


def prepare(
    model: nn.Module,
    plan: LayerPlan,
    masks: Mapping[str, Tensor] | None = None,
    scales: Mapping[str, Tensor] | None = None,
    gains: Mapping[str, Tensor] | None = None,
) -> dict[str, LSQFakeQuantizer]:
    """Fake-quantize ``plan``'s layers of ``model`` in place; returns the quantizers by module name.

    ``masks``: pruning keep-masks by ``state_dict`` key (``"net.0.weight"``); a resumed run's ``scales`` (the base
    scales ``s0``) and ``gains`` (the learned ``log_gain``, see :class:`~.fake_quant.LSQFakeQuantizer`) by the same
    key, used instead of the MSE initialisation (a scale without a gain: the gain 0). Every layer is checked before
    any is changed."""
    scales, gains = dict(scales or {}), dict(gains or {})
    for name, module in plan.layers.items():
        if parametrize.is_parametrized(module, weight_name(module)):
            raise ValueError(f"layer {name!r} is already parametrized (`torch.nn.utils.parametrize`); QAT needs a "
                             "plain weight: remove the other parametrization first")
        key = weight_key(name, module)
        grouped = LSQFakeQuantizer.scale_shape(getattr(module, weight_name(module)), plan.specs[name])
        for what, given in (("scale", scales.get(key)), ("log gain", gains.get(key))):
            if given is not None and tuple(given.shape) != grouped:
                raise ValueError(f"the learned {what} for {key!r} is shaped {tuple(given.shape)}, the layer "
                                 f"needs {grouped}: it belongs to another model or another granularity")
        if key in gains and key not in scales:
            raise ValueError(f"a learned log gain for {key!r} without its base scale")
    quantizers = {}
    for name, module in plan.layers.items():
        attr, key = weight_name(module), weight_key(name, module)
        weight = getattr(module, attr)
        quantizer = LSQFakeQuantizer(weight.detach(), plan.specs[name], (masks or {}).get(key))
        if key in scales:
            quantizer.load(scales[key], gains.get(key))
        parametrize.register_parametrization(module, attr, quantizer)
        quantizers[name] = quantizer
    return quantizers


def latent(module: nn.Module) -> nn.Parameter:
    """The latent float weight of a fake-quantized module (the parameter the optimizer trains)."""
    original: nn.Parameter = getattr(module.parametrizations, weight_name(module)).original
    return original


@torch.no_grad()
def release(model: nn.Module, quantizers: Mapping[str, LSQFakeQuantizer]) -> dict[str, QuantizedTensor]:
    """The codes of every fake-quantized layer; the parametrizations removed, the latent float weights (masked)
    left in place as the same parameters. Codes are read for every layer before any is changed."""
    modules = dict(model.named_modules())
    codes = {name: q.codes(latent(modules[name])) for name, q in quantizers.items()}
    for name, quantizer in quantizers.items():
        module = modules[name]
        weight = latent(module)
        if quantizer.mask is not None:
            weight.mul_(quantizer.mask.to(weight.dtype))
        parametrize.remove_parametrizations(module, weight_name(module), leave_parametrized=False)
    return codes


def convert(model: nn.Module, quantizers: Mapping[str, LSQFakeQuantizer], source: str = "QAT") -> QuantizationResult:
    """:func:`release`, then the dequantized codes written into the weights; the model carries the codes."""
    return carry(model, release(model, quantizers), source)


def carry(model: nn.Module, codes: Mapping[str, QuantizedTensor], source: str = "QAT") -> QuantizationResult:
    """``codes`` (what :func:`release` read) dequantized into the plain weights, nothing re-rounded; the model
    carries them."""
    modules = dict(model.named_modules())
    result = QuantizationResult()
    for name, qtensor in codes.items():
        result.layers[name] = record(name, modules[name], qtensor)
    result.skipped.update(float_leftovers(model, {n: modules[n] for n in result.layers}, result.skipped))
    attach(model, {layer.key: layer.qtensor for layer in result.layers.values()}, source)
    return result


def record(name: str, module: nn.Module, qtensor: QuantizedTensor) -> LayerQuantization:
    """Write ``qtensor`` (QAT's codes) into the module's plain weight; SQNR against the latent float weight."""
    return record_layer(name, module, qtensor, METHOD)


def plain_keys(state: dict[str, Any], model: nn.Module, names: list[str]) -> None:
    """Rewrite ``state`` (a ``state_dict`` of ``model`` with ``names`` fake-quantized) in place to the plain keys:
    ``<name>.parametrizations.<attr>.original`` -> ``<name>.<attr>``; the quantizers' own entries (the log gains)
    are removed (the callback's state carries them with the base scales)."""
    modules = dict(model.named_modules())
    for name in names:
        attr = weight_name(modules[name])
        prefix = f"{name}.parametrizations.{attr}" if name else f"parametrizations.{attr}"
        key = weight_key(name, modules[name])
        if f"{prefix}.original" in state:
            state[key] = state.pop(f"{prefix}.original")
        for extra in [k for k in state if k.startswith(f"{prefix}.")]:
            del state[extra]
