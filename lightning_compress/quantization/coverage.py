"""Whole-model coverage for :func:`~.functional.quantize`: what is selected by default, which weight of a module is
quantized, at how many bits, what is refused (non-finite weights) and what stays float, and why. No Lightning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor, nn

from lightning_compress.core.selection import (
    DEFAULT_MODULE_TYPES,
    check_patterns_match,
    compile_patterns,
    select_modules,
)
from lightning_compress.core.validation import check_number
from lightning_compress.quantization.primitives import QuantSpec, divisors

# What quantize() selects by default: every layer kind with a weight over input features, plus embedding tables and
# the fused q/k/v projection of nn.MultiheadAttention (the biggest tensors of a transformer). Pruning keeps
# core.selection.DEFAULT_MODULE_TYPES.
QUANT_MODULE_TYPES: tuple[str, ...] = (*DEFAULT_MODULE_TYPES, "Embedding", "torch.nn.MultiheadAttention")
_OPTIONAL_BY_DEFAULT = (nn.Embedding, nn.MultiheadAttention)  # kept float, not an error, when their shape does not fit
EMBEDDING_BITS = 8  # embeddings' default bits: a lookup table has no input Hessian, and its rows feed every layer
# Defaults that quantize() and PostTrainingQuantization share (their signatures say None and resolve here, so that
# an argument given explicitly can be told from the default; tests/callbacks/test_quantization.py checks the rest of
# the two signatures agree).
METHODS = ("rtn", "gptq")
FALLBACK = "more_bits"  # over a metric bound: the even widths up to 8 first (fewer bytes than straight to float)
CALIBRATION_BATCHES = 32  # GPTQ calibration batches
_QUANT_CLASSES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)


def weight_name(module: nn.Module) -> str:
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def weight_key(name: str, module: nn.Module) -> str:
    """The ``state_dict`` key of the quantized weight of module ``name``."""
    return f"{name}.{weight_name(module)}" if name else weight_name(module)


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
    """Raise naming every selected layer whose input size ``group_size`` does not divide, with its width, group
    sizes that fit it, and those that fit every selected layer."""
    unfit = group_misfits(layers, spec)
    if not unfit:
        return
    widths = [layer_weight(n, m)[0].numel() for n, m in layers.items()]
    lines = "; ".join(
        f"layer {name!r} ({type(layers[name]).__name__}): `group_size`={spec.group_size} does not divide the input "
        f"size {width}, allowed e.g. {divisors(width, spec.group_size)}"
        for name, width in unfit.items()
    )
    raise ValueError(
        f"{lines}. Group sizes that divide every selected layer's input size: "
        f"{divisors(math.gcd(*widths), spec.group_size)}; or leave these layers out with `exclude`, or use "
        "`granularity`='per_channel'"
    )


def group_misfits(layers: Mapping[str, nn.Module], spec: QuantSpec) -> dict[str, int]:
    """Selected layers whose input size (given) ``group_size`` does not divide, with that size."""
    if spec.granularity != "per_group":
        return {}
    widths = {name: layer_weight(name, module)[0].numel() for name, module in layers.items()}
    return {name: width for name, width in widths.items() if width % spec.group_size}


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


@dataclass
class LayerPlan:
    """What :func:`plan_layers` decided: the layers to quantize, each one's spec (bits, granularity), what stays
    float and why, and remarks (a layer quantized per channel because its group no longer fits)."""

    layers: dict[str, nn.Module]
    specs: dict[str, QuantSpec]
    skipped: dict[str, str]
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def bits(self) -> dict[str, int]:
        return {name: spec.bits for name, spec in self.specs.items()}


def plan_layers(
    model: nn.Module,
    spec: QuantSpec,
    module_types: Sequence[str] | None,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    bits_overrides: Mapping[str, int] | None,
    embedding_bits: int | None,
    *,
    regroup: bool = False,
) -> LayerPlan:
    """The one coverage of :func:`~.functional.quantize` and the callback. ``module_types=None`` is the default
    selection (:data:`QUANT_MODULE_TYPES`: embeddings at ``embedding_bits`` or :data:`EMBEDDING_BITS`, attention
    in-proj; those a group does not fit stay float); an explicit one quantizes its Embedding layers at ``bits``
    unless ``embedding_bits`` is given. A ``group_size`` that does not divide a selected layer's input size raises
    (:func:`check_group_size`); with ``regroup`` (the callback at the end of a fit, after compaction changed widths
    that ``setup`` checked) that layer is quantized per channel instead, with a note."""
    defaults = module_types is None
    types = QUANT_MODULE_TYPES if module_types is None else module_types
    layers, skipped = select_layers(model, types, include, exclude)
    if defaults:
        skipped.update(unfit_defaults(layers, spec))
        layers = {name: module for name, module in layers.items() if name not in skipped}
    if not layers:
        raise ValueError(
            f"nothing to quantize in {type(model).__name__}: no module matches `module_types`={list(types)!r}, "
            f"`include`={include!r}, `exclude`={exclude!r}"
        )
    misfits = group_misfits(layers, spec) if regroup else {}
    if not regroup:
        check_group_size(layers, spec)
    check_patterns_match("bits_overrides", list(bits_overrides or {}), list(layers), what="selected layer")
    emb_bits = embedding_bits if embedding_bits is not None else (EMBEDDING_BITS if defaults else spec.bits)
    specs, notes = {}, {}
    for name, module in layers.items():
        specs[name] = replace(spec, bits=bits_for(name, module, spec.bits, bits_overrides, emb_bits))
        if name in misfits:
            specs[name] = replace(specs[name], granularity="per_channel")
            notes[name] = (f"per_channel: `group_size`={spec.group_size} no longer divides its input size "
                           f"{misfits[name]} (changed during the fit, e.g. by structured compaction)")
    return LayerPlan(layers, specs, skipped, notes)


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

