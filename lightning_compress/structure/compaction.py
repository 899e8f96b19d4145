"""Physically remove pruned units, giving a smaller dense model. Pure PyTorch.

:func:`compact` takes keep-masks over the units of Linear / Conv layers and attention modules ("producers") and,
using the dependency groups of :func:`lightning_compress.structure.dependency.find_unit_groups`, slices the
producer's weight rows and bias, its BatchNorm followers' weight / bias / running statistics, and the consumers'
input columns (``repeat`` columns per unit after a flatten, shifted by ``offset`` after a concat), updating
``in_features`` / ``out_features`` / ``in_channels`` / ``out_channels`` / ``num_features``.

- Coupled producers (a residual add, the q / k / v of attention) share their units: a unit goes only when *every*
  coupled producer drops it (a missing mask keeps all), and units go in whole blocks (a head goes when none of its
  rows is kept, in any part).
- Attention: ``nn.MultiheadAttention`` is replaced by a :class:`~lightning_compress.structure.attention.
  PrunedMultiheadAttention` with the kept heads; a module holding Hugging Face style ``num_attention_heads`` /
  ``all_head_size`` next to its q / k / v Linears gets them updated.
- Units of unprunable groups are kept; the layers are listed in ``CompactionResult.skipped`` with the reason.
- Safety net: before committing, the compacted model is run on a random input shaped like ``example_input``
  (eval mode) and compared with the *masked* model (the removed units' producer rows, biases and follower
  weight / bias zeroed; consumers untouched). On a mismatch every change is rolled back and a ``RuntimeError``
  raised, so the model is never left silently wrong. :func:`verify_groups` runs the same trial per group.
- Optimizers hold the old parameters: build a new optimizer after compacting.

Saving and loading: :mod:`lightning_compress.structure.serialization` (re-exported here).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_compress.core.modules import weight_of
from lightning_compress.structure.attention import ATTENTION_TYPES, PrunedMultiheadAttention, attention_layout
from lightning_compress.structure.dependency import FOLLOWER_TYPES, UnitGroup, find_unit_groups, unit_weight
from lightning_compress.structure.serialization import (  # noqa: F401 - re-exported
    FORMAT,
    load_compacted,
    save_compacted,
    shrink_to_state_dict,
)
from lightning_compress.structure.shape_rules import record_compaction, shapes_of
from lightning_compress.structure.trace import analysis_mode, as_call


@dataclass
class CompactionResult:
    model: nn.Module
    units: dict[str, tuple[int, int]]  # producer -> (units before, units after)
    params_before: int
    params_after: int
    skipped: dict[str, str] = field(default_factory=dict)  # layer whose mask dropped units it could not -> why

    def __str__(self) -> str:
        changed = ", ".join(f"{n} {a}->{b}" for n, (a, b) in self.units.items() if a != b) or "no layer changed"
        skipped = f"; kept (unprunable): {self.skipped}" if self.skipped else ""
        return f"parameters {self.params_before:,} -> {self.params_after:,}; {changed}{skipped}"


@dataclass
class _Plan:
    rows: dict[str, Tensor] = field(default_factory=dict)  # producer / follower -> keep-mask over its rows
    cols: dict[str, Tensor] = field(default_factory=dict)  # consumer -> keep-mask over its input columns
    heads: dict[str, int] = field(default_factory=dict)  # module with HF-style head attributes -> heads kept
    skipped: dict[str, str] = field(default_factory=dict)


def compact(
    model: nn.Module, unit_masks: Mapping[str, Tensor], example_input: Any, *, inplace: bool = False
) -> CompactionResult:
    """Remove the units whose ``unit_masks[name]`` entry is False (True = keep) from ``model`` (a copy unless
    ``inplace``). The result computes what the masked model computes (pruned units zeroed), in fewer operations."""
    groups = find_unit_groups(model, example_input, verify=False)
    masks = _checked_masks(unit_masks, groups)
    if not inplace:
        model = copy.deepcopy(model)  # a LightningModule's deepcopy leaves its trainer behind
    modules = dict(model.named_modules())
    params_before, shapes_before = count_parameters(model), shapes_of(model)
    plan = _plan(groups, masks, modules)
    with analysis_mode(model), torch.no_grad():
        mismatch = _trial(model, modules, plan, _probe_input(example_input, model), keep=True)
    if mismatch:
        raise RuntimeError(f"compaction changed the model's outputs ({mismatch}); the model was left unchanged")
    record_compaction(model, shapes_before)  # which axes shrank: all that a saved file may shrink on loading
    units = {n: (g.num_units, int(plan.rows[n].sum()) if n in plan.rows else g.num_units) for n, g in groups.items()}
    return CompactionResult(model, units, params_before, count_parameters(model), plan.skipped)


def verify_groups(model: nn.Module, example_input: Any, groups: Mapping[str, UnitGroup]) -> None:
    """Remove one block of every prunable set on a copy of ``model`` and compare with the masked model; a set whose
    removal changes the outputs (or breaks the forward) becomes ``prunable=False`` with the difference as reason."""
    families = _families(groups)
    if not families:
        return
    trial = copy.deepcopy(model)
    modules = dict(trial.named_modules())

    def masks(chosen: list[list[str]]) -> dict[str, Tensor]:
        out = {}
        for family in chosen:
            group = groups[family[0]]
            unit = torch.ones(group.num_units // group.parts, dtype=torch.bool)
            unit[-group.block :] = False
            out[family[0]] = unit.repeat(group.parts)
        return out

    with analysis_mode(trial), torch.no_grad():
        inputs = _probe_input(example_input, trial)
        if not _trial(trial, modules, _plan(groups, masks(families), modules), inputs, keep=False):
            return
        for family in families:
            mismatch = _trial(trial, modules, _plan(groups, masks([family]), modules), inputs, keep=False)
            for name in family if mismatch else []:
                groups[name].prunable = False
                groups[name].reason = f"a trial removal of one of its units changed the model's outputs ({mismatch})"


def unit_masks_from_weights(model: nn.Module, groups: Mapping[str, UnitGroup]) -> dict[str, Tensor]:
    """Keep-masks read off the weights: a unit is pruned when its producer weight row and bias entry are exactly
    zero, and so are its entries in the followers' weight and bias (otherwise BatchNorm's shift would make the
    unit's output non-zero, and removing it would change the model)."""
    modules = dict(model.named_modules())
    masks = {}
    for name, group in groups.items():
        producer = modules[name]
        weight = unit_weight(producer).detach()
        alive = weight.reshape(weight.shape[0], -1).ne(0).any(dim=1)
        bias = _bias(producer)
        if bias is not None:
            alive |= bias.detach().ne(0)
        for follower in group.followers:
            for value in (modules[follower].weight, modules[follower].bias):
                if value is not None:
                    alive |= value.detach().ne(0).repeat(group.parts)
        masks[name] = alive.cpu()
    return masks


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, a tied (shared) parameter counted once."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- planning and applying
def _bias(module: nn.Module) -> Tensor | None:
    return module.in_proj_bias if isinstance(module, ATTENTION_TYPES) else getattr(module, "bias", None)


def _families(groups: Mapping[str, UnitGroup]) -> list[list[str]]:
    families, seen = [], set()
    for name, group in groups.items():
        if group.prunable and name not in seen and group.num_blocks > 1:
            family = [name, *[c for c in group.coupled if c in groups]]
            seen.update(family)
            families.append(family)
    return families


def _checked_masks(unit_masks: Mapping[str, Tensor], groups: Mapping[str, UnitGroup]) -> dict[str, Tensor]:
    out = {}
    for name, mask in unit_masks.items():
        if name not in groups:
            allowed = sorted(groups)
            raise ValueError(
                f"`unit_masks` names {name!r}, which is not a Linear / Conv layer or attention module; "
                f"allowed: {allowed}"
            )
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (groups[name].num_units,):
            got = type(mask).__name__
            if isinstance(mask, Tensor):
                got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}"
            raise ValueError(
                f"`unit_masks[{name!r}]` must be a bool tensor of shape ({groups[name].num_units},), got {got}"
            )
        if not bool(mask.any()):
            raise ValueError(f"`unit_masks[{name!r}]` keeps no unit; a layer must keep at least one")
        out[name] = mask.detach().cpu()
    return out


def family_units(group: UnitGroup, masks: Mapping[str, Tensor], family: list[str]) -> Tensor:
    """Keep-mask over the units of one part of a coupled set: a unit stays when any member keeps it in any part,
    extended to whole blocks."""
    units = group.num_units // group.parts
    keep = torch.zeros(units, dtype=torch.bool)
    for member in family:
        mask = masks.get(member)
        keep |= mask.view(-1, units).any(0) if mask is not None else torch.ones(units, dtype=torch.bool)
    return keep.view(-1, group.block).any(1).repeat_interleave(group.block)


def _plan(groups: Mapping[str, UnitGroup], masks: Mapping[str, Tensor], modules: Mapping[str, nn.Module]) -> _Plan:
    plan = _Plan()
    for name, group in groups.items():
        if not group.prunable:
            if name in masks and not bool(masks[name].all()):
                plan.skipped[name] = group.reason
            continue
        if name in plan.rows:
            continue  # done with a coupled producer
        family = [name, *group.coupled]
        keep = family_units(group, masks, family)
        if bool(keep.all()):
            continue
        for layer in family:
            plan.rows[layer] = keep.repeat(groups[layer].parts)
            parent = modules.get(layer.rpartition(".")[0])
            if group.block > 1 and hasattr(parent, "num_attention_heads"):
                plan.heads[layer.rpartition(".")[0]] = int(keep.sum()) // group.block
        for follower in group.followers:
            plan.rows[follower] = keep
        for consumer, repeat, offset in group.consumers:
            width = weight_of(modules[consumer], consumer).shape[1]
            if offset + keep.numel() * repeat > width:
                raise RuntimeError(f"dependency group of {name!r} maps units past the {width} inputs of {consumer!r}")
            column = plan.cols.setdefault(consumer, torch.ones(width, dtype=torch.bool))
            column[offset : offset + keep.numel() * repeat] &= keep.repeat_interleave(repeat)
    return plan


def _apply(modules: Mapping[str, nn.Module], plan: _Plan) -> list[tuple[nn.Module, str, object]]:
    """Slice every listed module; return what to set back to undo it."""
    undo: list[tuple[nn.Module, str, object]] = []

    def replace(module: nn.Module, name: str, value: object) -> None:
        undo.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def sliced(module: nn.Module, name: str, index: tuple) -> None:
        old = getattr(module, name, None)
        if isinstance(old, nn.Parameter):
            replace(module, name, nn.Parameter(old.detach()[index].clone(), requires_grad=old.requires_grad))
        elif isinstance(old, Tensor):
            replace(module, name, old[index].clone())

    for name, keep in plan.cols.items():  # before attention modules are rebuilt around their out_proj
        module = modules[name]
        sliced(module, "weight", (slice(None), keep.to(weight_of(module, name).device)))
        replace(module, _size_attributes(module)[1], int(keep.sum()))
    for name, keep in plan.rows.items():
        module = modules[name]
        if isinstance(module, ATTENTION_TYPES):
            parent_name, _, child = name.rpartition(".")
            new = PrunedMultiheadAttention.like(module, int(keep.sum()) // 3 // attention_layout(module)[2])
            with torch.no_grad():
                new.in_proj_weight.copy_(module.in_proj_weight[keep.to(module.in_proj_weight.device)])
                if module.in_proj_bias is not None and new.in_proj_bias is not None:  # like() copies the bias flag
                    new.in_proj_bias.copy_(module.in_proj_bias[keep.to(module.in_proj_bias.device)])
            new.out_proj = module.out_proj
            replace(modules[parent_name], child, new)
            continue
        keep = keep.to(weight_of(module, name).device)
        for tensor_name in ("weight", "bias", "running_mean", "running_var"):
            sliced(module, tensor_name, (keep,))
        replace(module, _size_attributes(module)[0], int(keep.sum()))
    for name, heads in plan.heads.items():
        module = modules[name]
        replace(module, "num_attention_heads", heads)
        head_size = getattr(module, "attention_head_size", None)
        if hasattr(module, "all_head_size") and isinstance(head_size, int):
            replace(module, "all_head_size", heads * head_size)
    return undo


def _size_attributes(module: nn.Module) -> tuple[str, str]:
    if isinstance(module, nn.Linear):
        return "out_features", "in_features"
    if isinstance(module, FOLLOWER_TYPES):
        return "num_features", "num_features"
    return "out_channels", "in_channels"


# ---------------------------------------------------------------------------- the safety net
def _trial(model: nn.Module, modules: Mapping[str, nn.Module], plan: _Plan, inputs: tuple, *, keep: bool) -> str:
    """Apply ``plan`` and compare with the masked model; undo on a mismatch (always, unless ``keep``). Returns the
    mismatch ("" when the outputs agree)."""
    expected = _masked_outputs(model, modules, plan.rows, inputs)
    undo = _apply(modules, plan)
    try:
        mismatch = _mismatch(expected, _outputs(model, inputs))
    except Exception as err:
        mismatch = f"the compacted model raised {type(err).__name__}: {err}"
    if mismatch or not keep:
        for module, name, value in reversed(undo):
            setattr(module, name, value)
    return mismatch


def _probe_input(example_input: Any, model: nn.Module) -> tuple[tuple, dict]:
    """Random normal tensors shaped like the floating-point example inputs (a zero example checks little)."""
    generator = torch.Generator().manual_seed(0)
    args, kwargs = as_call(example_input, model)

    def probe(x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            return torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        return x

    return tuple(probe(a) for a in args), {k: probe(v) for k, v in kwargs.items()}


def _outputs(model: nn.Module, inputs: tuple[tuple, dict]) -> list[Tensor]:
    out = model(*inputs[0], **inputs[1])
    leaves = tree_leaves(dict(out) if isinstance(out, Mapping) else out)
    return [t.detach().clone() for t in leaves if isinstance(t, Tensor)]


def _masked_outputs(
    model: nn.Module, modules: Mapping[str, nn.Module], rows: Mapping[str, Tensor], inputs: tuple[tuple, dict]
) -> list[Tensor]:
    """Outputs of the masked model: removed units zeroed in the producers (weight row, bias) and followers (weight,
    bias), parameters restored afterwards. Consumer columns are left alone on purpose, so that the comparison also
    checks the analysis' claim that a zeroed unit stays zero until its consumers."""
    saved = []
    for name, keep in rows.items():
        module = modules[name]
        weight = unit_weight(module) if not isinstance(module, FOLLOWER_TYPES) else module.weight
        for p in (weight, _bias(module)):
            if p is not None:
                saved.append((p, p.detach().clone()))
                p.mul_(keep.to(p.device).view(-1, *[1] * (p.dim() - 1)).to(p.dtype))
    try:
        return _outputs(model, inputs)
    finally:
        for p, value in reversed(saved):
            p.copy_(value)


def _mismatch(expected: list[Tensor], got: list[Tensor]) -> str:
    if [t.shape for t in expected] != [t.shape for t in got]:
        return f"output shapes {[tuple(t.shape) for t in expected]} became {[tuple(t.shape) for t in got]}"
    for a, b in zip(expected, got):
        if a.is_floating_point():
            finite = a.isfinite() & b.isfinite()
            if not torch.equal(a.isfinite(), b.isfinite()):
                return "non-finite outputs differ"
            scale = max(1.0, float(a[finite].abs().max())) if finite.any() else 1.0
            error = float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0
            if error > max(1e-4, 10 * torch.finfo(a.dtype).eps) * scale:  # fp32: 1e-4, bf16: 0.08 (of the max)
                return f"max abs difference {error:.3g}"
        elif not torch.equal(a, b):
            return "integer outputs differ"
    return ""
