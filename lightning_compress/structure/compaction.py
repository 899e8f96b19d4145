"""Physically remove pruned units, giving a smaller dense model; save it and load it back. Pure PyTorch.

:func:`compact` takes keep-masks over the output units of Linear / Conv layers ("producers") and, using the
dependency groups of :func:`lightning_compress.structure.dependency.find_unit_groups`, slices the producer's weight rows
and bias, its BatchNorm followers' weight / bias / running statistics, and the consumers' input columns
(``repeat`` columns per unit after a flatten, shifted by ``offset`` after a concat), updating
``in_features`` / ``out_features`` / ``in_channels`` / ``out_channels`` / ``num_features``.

- Coupled producers (a residual add) share their units: a unit goes only when *every* coupled producer drops
  it (a missing mask keeps all), so a unit some branch still uses is never cut.
- Units of unprunable groups are kept; the layers are listed in ``CompactionResult.skipped`` with the reason.
- Safety net: before committing, the compacted model is run on a random input shaped like ``example_input``
  (eval mode) and compared with the *masked* model (the removed units' producer rows, biases and follower
  weight / bias zeroed; consumers untouched). On a mismatch every change is rolled back and a ``RuntimeError``
  raised, so the model is never left silently wrong.
- Optimizers hold the old parameters: build a new optimizer after compacting.

Reloading: a compacted state_dict has new shapes. :func:`save_compacted` writes a safetensors file (no pickle,
temp file + ``os.replace``); :func:`load_compacted` shrinks a freshly built instance to the shapes in the file
and loads it strictly. :func:`shrink_to_state_dict` does the shrinking alone, e.g. before
``model.load_state_dict(torch.load(ckpt)["state_dict"])`` for a Lightning checkpoint written after compaction.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_compress.structure.dependency import FOLLOWER_TYPES, PRODUCER_TYPES, UnitGroup, as_args, find_unit_groups

FORMAT = "lightning_compress.compacted/1"


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


def compact(
    model: nn.Module, unit_masks: Mapping[str, Tensor], example_input: Tensor | tuple, *, inplace: bool = False
) -> CompactionResult:
    """Remove the units whose ``unit_masks[name]`` entry is False (True = keep) from ``model`` (a copy unless
    ``inplace``). The result computes what the masked model computes (pruned units zeroed), in fewer operations."""
    groups = find_unit_groups(model, example_input)
    masks = _checked_masks(unit_masks, groups)
    if not inplace:
        model = copy.deepcopy(model)  # a LightningModule's deepcopy leaves its trainer behind
    modules = dict(model.named_modules())
    params_before = count_parameters(model)
    rows, cols, skipped = _plan(groups, masks, modules)
    with _eval_mode(model), torch.no_grad():
        inputs = _probe_input(example_input, model)
        expected = _masked_outputs(model, modules, rows, inputs)
        undo = _apply(modules, rows, cols)
        try:
            mismatch = _mismatch(expected, _outputs(model, inputs))
        except Exception as err:  # noqa: BLE001 - any failure of the compacted model means: roll back
            mismatch = f"the compacted model raised {type(err).__name__}: {err}"
        if mismatch:
            for module, name, value in reversed(undo):
                setattr(module, name, value)
            raise RuntimeError(f"compaction changed the model's outputs ({mismatch}); the model was left unchanged")
    units = {n: (g.num_units, int(rows[n].sum()) if n in rows else g.num_units) for n, g in groups.items()}
    return CompactionResult(model, units, params_before, count_parameters(model), skipped)


def unit_masks_from_weights(model: nn.Module, groups: Mapping[str, UnitGroup]) -> dict[str, Tensor]:
    """Keep-masks read off the weights: a unit is pruned when its producer weight row and bias entry are exactly
    zero, and so are its entries in the followers' weight and bias (otherwise BatchNorm's shift would make the
    unit's output non-zero, and removing it would change the model)."""
    modules = dict(model.named_modules())
    masks = {}
    for name, group in groups.items():
        producer = modules[name]
        alive = producer.weight.detach().reshape(producer.weight.shape[0], -1).ne(0).any(dim=1)
        for module in [producer] + [modules[f] for f in group.followers]:
            for pname in ("weight", "bias") if module is not producer else ("bias",):
                value = getattr(module, pname, None)
                if value is not None:
                    alive |= value.detach().ne(0)
        masks[name] = alive.cpu()
    return masks


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- planning and applying
def _checked_masks(unit_masks: Mapping[str, Tensor], groups: Mapping[str, UnitGroup]) -> dict[str, Tensor]:
    out = {}
    for name, mask in unit_masks.items():
        if name not in groups:
            allowed = sorted(groups)
            raise ValueError(f"`unit_masks` names {name!r}, which is not a Linear / Conv layer; allowed: {allowed}")
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


def _plan(
    groups: Mapping[str, UnitGroup], masks: Mapping[str, Tensor], modules: Mapping[str, nn.Module]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
    """Row keep-masks for producers and followers, column keep-masks for consumers, layers skipped."""
    rows: dict[str, Tensor] = {}
    cols: dict[str, Tensor] = {}
    skipped = {}
    for name, group in groups.items():
        if not group.prunable:
            if name in masks and not bool(masks[name].all()):
                skipped[name] = group.reason
            continue
        if name in rows:
            continue  # done with a coupled producer
        family = [name, *group.coupled]
        keep = torch.zeros(group.num_units, dtype=torch.bool)
        for producer in family:
            keep |= masks.get(producer, torch.ones(group.num_units, dtype=torch.bool))
        if bool(keep.all()):
            continue
        for layer in family + group.followers:
            rows[layer] = keep
        for consumer, repeat, offset in group.consumers:
            width = modules[consumer].weight.shape[1]
            if offset + keep.numel() * repeat > width:
                raise RuntimeError(f"dependency group of {name!r} maps units past the {width} inputs of {consumer!r}")
            column = cols.setdefault(consumer, torch.ones(width, dtype=torch.bool))
            column[offset : offset + keep.numel() * repeat] &= keep.repeat_interleave(repeat)
    return rows, cols, skipped


def _apply(
    modules: Mapping[str, nn.Module], rows: Mapping[str, Tensor], cols: Mapping[str, Tensor]
) -> list[tuple[nn.Module, str, object]]:
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

    for name, keep in rows.items():
        module = modules[name]
        keep = keep.to(module.weight.device)
        for tensor_name in ("weight", "bias", "running_mean", "running_var"):
            sliced(module, tensor_name, (keep,))
        replace(module, _size_attributes(module)[0], int(keep.sum()))
    for name, keep in cols.items():
        module = modules[name]
        sliced(module, "weight", (slice(None), keep.to(module.weight.device)))
        replace(module, _size_attributes(module)[1], int(keep.sum()))
    return undo


def _size_attributes(module: nn.Module) -> tuple[str, str]:
    if isinstance(module, nn.Linear):
        return "out_features", "in_features"
    if isinstance(module, FOLLOWER_TYPES):
        return "num_features", "num_features"
    return "out_channels", "in_channels"


# ---------------------------------------------------------------------------- the safety net
@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _probe_input(example_input: Tensor | tuple, model: nn.Module) -> tuple:
    """Random normal tensors shaped like the floating-point example inputs (a zero example checks little)."""
    generator = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        if isinstance(x, Tensor) and x.is_floating_point()
        else x
        for x in as_args(example_input, model)
    )


def _outputs(model: nn.Module, inputs: tuple) -> list[Tensor]:
    leaves = torch.utils._pytree.tree_leaves(model(*inputs))
    return [t.detach().clone() for t in leaves if isinstance(t, Tensor)]


def _masked_outputs(
    model: nn.Module, modules: Mapping[str, nn.Module], rows: Mapping[str, Tensor], inputs: tuple
) -> list[Tensor]:
    """Outputs of the masked model: removed units zeroed in the producers (weight row, bias) and followers (weight,
    bias), parameters restored afterwards. Consumer columns are left alone on purpose, so that the comparison also
    checks the analysis' claim that a zeroed unit stays zero until its consumers."""
    saved = []
    for name, keep in rows.items():
        for pname in ("weight", "bias"):
            p = getattr(modules[name], pname, None)
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
            scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
            error = float((a - b).abs().max()) if a.numel() else 0.0
            if error > max(1e-4, 10 * torch.finfo(a.dtype).eps) * scale:  # fp32: 1e-4, bf16: 0.08 (of the max)
                return f"max abs difference {error:.3g}"
        elif not torch.equal(a, b):
            return "integer outputs differ"
    return ""


# ---------------------------------------------------------------------------- saving and loading
def save_compacted(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's weights (with their compacted shapes) to a safetensors file, atomically."""
    from safetensors.torch import save_model

    path = os.fspath(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        save_model(model, temporary, metadata={"format": FORMAT})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_compacted(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Shrink a freshly built ``model`` (same class and arguments as the one saved) to the shapes recorded by
    :func:`save_compacted` and load the weights strictly. Returns ``model``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`path` {path!r} does not exist")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"`path` {path!r} was not written by save_compacted (format {metadata.get('format')!r})")
    shrink_to_state_dict(model, load_file(path))
    load_model(model, path, strict=True)
    return model


def shrink_to_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Resize ``model``'s Linear / Conv / BatchNorm layers to the shapes their tensors have in ``state_dict``
    (new parameters are zero-filled, to be overwritten by ``load_state_dict``). Returns ``model``."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = state_dict.get(f"{prefix}weight")
        if type(module) in PRODUCER_TYPES and weight is not None:
            if weight.shape[2:] != module.weight.shape[2:] or weight.dim() != module.weight.dim():
                raise ValueError(f"`state_dict[{prefix + 'weight'!r}]` has shape {tuple(weight.shape)}, "
                                 f"which `{name}` ({type(module).__name__}) cannot take")
            out, fan_in = weight.shape[0], weight.shape[1]
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = out, fan_in
            else:
                module.out_channels, module.in_channels = out, fan_in * module.groups
            _resize(module, "weight", weight.shape)
            _resize(module, "bias", (out,))
        elif type(module) in FOLLOWER_TYPES:
            reference = weight if weight is not None else state_dict.get(f"{prefix}running_mean")
            if reference is not None:
                module.num_features = reference.shape[0]
                for tensor_name in ("weight", "bias", "running_mean", "running_var"):
                    _resize(module, tensor_name, reference.shape)
    return model


def _resize(module: nn.Module, name: str, shape: tuple | torch.Size) -> None:
    old = getattr(module, name, None)
    if isinstance(old, Tensor) and old.shape != shape:
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(module, name, new)
