"""``quantize(model, bits=8, ...)``: post-training weight quantization of any ``nn.Module``, no Trainer needed.

Selected weights are quantized with :mod:`lightning_compress.quantization.primitives` and replaced *in place* by their
dequantized float values, so the model keeps running with ordinary float kernels (and stays trainable, loadable,
exportable). The returned :class:`QuantizationResult` holds, per layer, the integer codes and qparams (what
:func:`~lightning_compress.quantization.export.save_quantized` writes) and the SQNR in dB.

Which weight of a module is quantized: ``weight`` (Linear, Conv1d/2d/3d, Embedding, or any selected class with a
2-D+ ``weight``), and ``in_proj_weight`` for ``nn.MultiheadAttention`` (its fused q/k/v projection; select it with
``module_types=[..., "torch.nn.MultiheadAttention"]``). Biases stay float. A weight shared by two selected
modules (tied embeddings) is quantized once, under its first name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.selection import DEFAULT_MODULE_TYPES, compile_patterns, select_modules
from lightning_compress.core.validation import check_number
from lightning_compress.quantization.packing import packed_nbytes
from lightning_compress.quantization.primitives import (
    QuantizedTensor,
    QuantSpec,
    grouped_view,
    quantize_tensor,
    sqnr_db,
)



def weight_name(module: nn.Module) -> str:
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def _weight(name: str, module: nn.Module) -> Tensor:
    attr = weight_name(module)
    weight = getattr(module, attr, None)
    if not isinstance(weight, Tensor) or weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(
            f"`module_types` selected {name!r} ({type(module).__name__}) whose `{attr}` is not a float tensor with "
            "2 or more dims; only such weights can be quantized (exclude it with `exclude`)"
        )
    return weight


@dataclass
class LayerQuantization:
    """One quantized weight: where it lives, its codes/qparams and how faithful it is."""

    module: str  # qualified module name, e.g. "net.1"
    attr: str  # "weight" or "in_proj_weight"
    module_type: str
    qtensor: QuantizedTensor
    sqnr_db: float
    sparsity: float  # fraction of exact zeros after quantization (equals the fraction before: zeros stay zero)

    @property
    def key(self) -> str:
        """The weight's ``state_dict`` key."""
        return f"{self.module}.{self.attr}" if self.module else self.attr

    @property
    def bits(self) -> int:
        return self.qtensor.spec.bits

    def nbytes(self) -> int:
        """Bytes of codes (packed) plus scales and zero points, as exported."""
        qt = self.qtensor
        codes = packed_nbytes(qt.q.numel(), qt.spec.bits)
        extra = qt.scale.numel() * qt.scale.element_size()
        if qt.zero_point is not None:
            extra += packed_nbytes(qt.zero_point.numel(), qt.spec.bits)
        return codes + extra

    def summary(self) -> dict[str, Any]:
        spec = self.qtensor.spec
        return {
            "module": self.module,
            "type": self.module_type,
            "bits": spec.bits,
            "granularity": spec.granularity,
            "group_size": spec.group_size if spec.granularity == "per_group" else None,
            "symmetric": spec.symmetric,
            "calibration": spec.calibration,
            "scale_dtype": str(self.qtensor.scale.dtype).removeprefix("torch."),
            "shape": list(self.qtensor.shape),
            "sqnr_db": self.sqnr_db,
            "sparsity": self.sparsity,
            "nbytes": self.nbytes(),
        }


@dataclass
class QuantizationResult:
    layers: dict[str, LayerQuantization] = field(default_factory=dict)  # by module name, in model order
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why (e.g. tied weight)

    def sqnr(self) -> dict[str, float]:
        return {name: layer.sqnr_db for name, layer in self.layers.items()}

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: layer.summary() for name, layer in self.layers.items()}


def select_layers(
    model: nn.Module,
    module_types: Sequence[str] = DEFAULT_MODULE_TYPES,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Selected modules with a quantizable weight, each weight once; and the skipped ones with the reason."""
    if isinstance(module_types, str):
        raise TypeError(f"`module_types` must be a list of type names, got the string {module_types!r}")
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    owner: dict[int, str] = {}
    for name, module in select_modules(model, module_types, include, exclude).items():
        weight = _weight(name, module)
        if id(weight) in owner:
            skipped[name] = f"weight tied to {owner[id(weight)]!r}, quantized there"
            continue
        owner[id(weight)] = name
        chosen[name] = module
    return chosen, skipped


def resolve_bits(name: str, bits: int, overrides: Mapping[str, int] | None) -> int:
    """``bits``, unless a ``bits_overrides`` regex (first match, in order) matches the module name."""
    for pattern, value in (overrides or {}).items():
        if re.search(pattern, name):
            return value
    return bits


def check_bits_overrides(overrides: Mapping[str, int] | None) -> None:
    if overrides is None:
        return
    if not isinstance(overrides, Mapping):
        raise TypeError(f"`bits_overrides` must map name regexes to bits, got {overrides!r}")
    compile_patterns("bits_overrides", list(overrides))
    for pattern, value in overrides.items():
        check_number(f"bits_overrides[{pattern!r}]", value, low=2, high=8, integer=True)


def check_group_size(layers: Mapping[str, nn.Module], spec: QuantSpec) -> None:
    """Raise naming the first selected layer whose input size ``group_size`` does not divide."""
    if spec.granularity != "per_group":
        return
    for name, module in layers.items():
        weight = _weight(name, module)
        try:
            grouped_view(weight.detach(), spec.granularity, spec.group_size)
        except ValueError as err:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}): {err} (or leave it out with `exclude`)"
            ) from None


def quantize_layer(name: str, module: nn.Module, spec: QuantSpec) -> LayerQuantization:
    """Quantize one module's weight and write the dequantized values into it, in place."""
    weight = _weight(name, module)
    qtensor = quantize_tensor(weight, spec)
    dequantized = qtensor.dequantize()
    with torch.no_grad():
        sqnr = sqnr_db(weight, dequantized)
        weight.copy_(dequantized)
        sparsity = float((weight == 0).sum().item()) / max(1, weight.numel())
    return LayerQuantization(name, weight_name(module), type(module).__name__, qtensor, sqnr, sparsity)


def quantize(
    model: nn.Module,
    bits: int = 8,
    granularity: str = "per_channel",
    group_size: int = 128,
    symmetric: bool = True,
    calibration: str = "minmax",
    *,
    percentile: float = 99.9,
    mse_grid: int = 80,
    scale_dtype: str = "float32",
    module_types: Sequence[str] = DEFAULT_MODULE_TYPES,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    bits_overrides: Mapping[str, int] | None = None,
) -> QuantizationResult:
    """Quantize the weights of ``model``'s selected layers to ``bits``-bit integers, in place (dequantized).

    Args:
        bits: 2..8. ``bits_overrides`` maps module-name regexes to other bit widths (first match wins).
        granularity: ``"per_tensor"``, ``"per_channel"`` (per output channel / Embedding row) or ``"per_group"``
            (``group_size`` consecutive inputs of one output channel; must divide each selected layer's input size).
        symmetric: signed codes, zero point 0; else affine with an integer zero point.
        calibration: ``"minmax"``, ``"percentile"`` (``percentile`` of ``|w|``) or ``"mse"`` (clipping-ratio grid
            search of ``mse_grid`` points, minimizing reconstruction error per channel / group).
        scale_dtype: ``"float32"`` or ``"float16"`` (smaller files for small groups; see ``math``).
        module_types, include, exclude: which modules (see :func:`lightning_compress.select_modules`).

    Returns:
        the per-layer codes, qparams, SQNR and sparsity. Layers are quantized in model order.
    """
    spec = QuantSpec(bits, granularity, group_size, symmetric, calibration, percentile, mse_grid, scale_dtype)
    check_bits_overrides(bits_overrides)
    layers, skipped = select_layers(model, module_types, include, exclude)
    if not layers:
        raise ValueError(
            f"nothing to quantize: no module matches `module_types`={list(module_types)!r}, "
            f"`include`={include!r}, `exclude`={exclude!r}"
        )
    check_group_size(layers, spec)
    result = QuantizationResult(skipped=skipped)
    for name, module in layers.items():
        layer_spec = replace(spec, bits=resolve_bits(name, bits, bits_overrides))
        result.layers[name] = quantize_layer(name, module, layer_spec)
    return result
