"""Whole-model coverage for :func:`~.functional.quantize`: what is selected by default, which weight of a module is
quantized, at how many bits, what is refused (non-finite weights) and what stays float, and why. No Lightning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from lightning_compress.core.selection import DEFAULT_MODULE_TYPES, compile_patterns, select_modules
from lightning_compress.core.validation import check_number
from lightning_compress.quantization.primitives import QuantSpec, grouped_view

# What quantize() selects by default: every layer kind with a weight over input features, plus embedding tables and
# the fused q/k/v projection of nn.MultiheadAttention (the biggest tensors of a transformer). Pruning keeps
# core.selection.DEFAULT_MODULE_TYPES.
QUANT_MODULE_TYPES: tuple[str, ...] = (*DEFAULT_MODULE_TYPES, "Embedding", "torch.nn.MultiheadAttention")
_OPTIONAL_BY_DEFAULT = (nn.Embedding, nn.MultiheadAttention)  # kept float, not an error, when their shape does not fit
EMBEDDING_BITS = 8  # embeddings' default bits: a lookup table has no input Hessian, and its rows feed every layer
_QUANT_CLASSES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)


def weight_name(module: nn.Module) -> str:
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def layer_weight(name: str, module: nn.Module) -> Tensor:
    attr = weight_name(module)
    weight = getattr(module, attr, None)
    if not isinstance(weight, Tensor) or weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(
            f"`module_types` selected {name!r} ({type(module).__name__}) whose `{attr}` is not a float tensor with "
            "2 or more dims; only such weights can be quantized (exclude it with `exclude`)"
        )
    return weight


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
        weight = layer_weight(name, module)
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
        weight = layer_weight(name, module)
        try:
            grouped_view(weight.detach(), spec.granularity, spec.group_size)
        except ValueError as err:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}): {err} (or leave it out with `exclude`)"
            ) from None


def check_finite(layers: Mapping[str, nn.Module]) -> None:
    """Raise naming every selected layer whose weight holds NaN / inf (before anything is changed)."""
    bad = []
    for name, module in layers.items():
        weight = layer_weight(name, module).detach()
        if not bool(weight.isfinite().all()):
            nan, inf = int(weight.isnan().sum()), int(weight.isinf().sum())
            bad.append(f"{name!r} ({type(module).__name__}.{weight_name(module)}: {nan} NaN, {inf} inf)")
    if bad:
        raise ValueError(
            f"cannot quantize non-finite weights: {', '.join(bad)}. One NaN / inf makes its row's range (or the "
            "tensor's) non-finite and would silently zero or poison it; fix the weights or leave these layers out "
            "with `exclude`"
        )


def unfit_defaults(layers: Mapping[str, nn.Module], spec: QuantSpec) -> dict[str, str]:
    """Default-selected Embedding / MultiheadAttention layers whose input size ``group_size`` does not divide: they
    stay float (an explicitly selected layer raises instead, as every other layer)."""
    if spec.granularity != "per_group":
        return {}
    return {
        name: f"kept float: `group_size`={spec.group_size} does not divide its input size"
        for name, module in layers.items()
        if isinstance(module, _OPTIONAL_BY_DEFAULT) and layer_weight(name, module)[0].numel() % spec.group_size
    }


def bits_for(name: str, module: nn.Module, bits: int, overrides: Mapping[str, int] | None, embedding_bits: int) -> int:
    if any(re.search(pattern, name) for pattern in overrides or {}):
        return resolve_bits(name, bits, overrides)
    return embedding_bits if isinstance(module, nn.Embedding) else bits


def float_leftovers(model: nn.Module, layers: Mapping[str, nn.Module], skipped: Mapping[str, str]) -> dict[str, str]:
    """Every other module that owns parameters, with why they stay float."""
    out = {}
    for name, module in model.named_modules():
        if name in layers or name in skipped or not any(True for _ in module.parameters(recurse=False)):
            continue
        kind = type(module).__name__
        if "Norm" in kind:
            out[name] = f"{kind}: normalization scale / shift stay float (one value per feature)"
        elif isinstance(module, _QUANT_CLASSES):
            out[name] = f"{kind}: not selected (`module_types`, `include`, `exclude`)"
        elif isinstance(module, nn.MultiheadAttention):
            out[name] = "MultiheadAttention: in_proj_bias stays float (biases are never quantized)"
        else:
            names = ", ".join(n for n, _ in module.named_parameters(recurse=False))
            out[name] = f"{kind}: parameters ({names}) are not a layer weight; they stay float"
    return out

