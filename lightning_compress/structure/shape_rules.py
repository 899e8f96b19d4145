"""What a loaded file may say about the model's shapes: the model decides, the file may only shrink what compaction
shrank. Pure PyTorch, no Lightning.

Compaction (:func:`~lightning_compress.structure.compaction.compact`) removes units and so shrinks some axes of
some tensors: a producer's rows (axis 0 of its weight and bias, its BatchNorm followers' vectors, the rows of
``in_proj_weight``) and its consumers' input columns (axis 1). :func:`record_compaction` keeps on the model *which*
axes of *which* ``state_dict`` keys compaction shrank, and their size before it (a plain attribute, copied by
``copy.deepcopy``, not in the ``state_dict``); every writer (``save_compacted``, ``save_quantized``, ``save_float``,
``compressed.ckpt``) stores it under :data:`RECORD_KEY` as ``{key: {axis: size before compaction}}``.

The rule (:func:`check_declared_shapes`), applied by every loader before the model is resized or any tensor is
allocated: a file holds exactly the model's keys; each declared shape has the model's rank; an axis the file's
record lists must have been compacted *from the model's size* and may be smaller than or equal to it, every other
axis must *equal* the model's (the model's size as built: :func:`full_shapes`, also for a model compacted in
memory); a model built directly at the compacted size (the declared size equals its own) is that architecture and
loads. So a file can never grow the model, change its input size or its depth, nor be the
compaction of a model of another width; an 8 KiB file declaring a (20000, 20000) weight is refused before anything
is allocated. Refusals are :class:`~lightning_compress.core.io.UntrustedFileError`
naming the file, the key and both shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_compress.core.io import UntrustedFileError

RECORD_KEY = "compacted_axes"  # where files store the record: {state_dict key: {axis: size before compaction}}
ATTRIBUTE = "_lightning_compress_compacted_axes"

CompactedAxes = dict[str, dict[int, int]]  # state_dict key -> {axis compaction shrank: its size before}


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every ``state_dict`` entry's shape."""
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def record_compaction(model: nn.Module, before: Mapping[str, Sequence[int]]) -> CompactedAxes:
    """Record on ``model`` the axes whose size changed since ``before`` (its shapes before compacting), with that
    earlier size, added to any earlier record (compacting twice keeps the first size). Every submodule gets its
    part of the record (its own keys), so saving a submodule (``model.backbone``) writes what was compacted in it.
    Returns the whole record."""
    record = compacted_axes(model)
    for key, shape in shapes_of(model).items():
        old = tuple(before.get(key, shape))
        if len(old) != len(shape):
            continue
        for axis, (size_before, size) in enumerate(zip(old, shape)):
            if size_before != size:
                record.setdefault(key, {}).setdefault(axis, size_before)
            if record.get(key, {}).get(axis) == size:  # back to its full size (a file loaded into it)
                del record[key][axis]
    record = {key: axes for key, axes in record.items() if axes}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = {key[len(prefix):]: dict(axes) for key, axes in record.items() if key.startswith(prefix)}
        object.__setattr__(module, ATTRIBUTE, own)
    return compacted_axes(model)


def compacted_axes(model: nn.Module) -> CompactedAxes:
    """The record of :func:`record_compaction` for ``model``'s ``state_dict`` keys, whether it was compacted
    itself or inside a submodule (empty for a model never compacted)."""
    record: CompactedAxes = {}
    for name, module in model.named_modules():
        own = module.__dict__.get(ATTRIBUTE)
        if not isinstance(own, dict):
            continue
        prefix = f"{name}." if name else ""
        for key, axes in own.items():
            for axis, size in axes.items():
                record.setdefault(prefix + key, {}).setdefault(axis, size)
    return record


def full_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every ``state_dict`` entry's shape as the model was built: compacted axes at their size before compaction
    (what a file is checked against, whether the model in memory is compacted or not)."""
    record = compacted_axes(model)
    return {key: tuple(record.get(key, {}).get(axis, size) for axis, size in enumerate(shape))
            for key, shape in shapes_of(model).items()}


def encode(record: Mapping[str, Mapping[int, int]]) -> dict[str, dict[str, int]]:
    """The record as JSON (object keys are strings), sorted."""
    return {key: {str(axis): int(size) for axis, size in sorted(axes.items())} for key, axes in sorted(record.items())}


def parse_record(name: str, value: Any, field: str = RECORD_KEY) -> CompactedAxes:
    """A record read from a file, checked: ``{state_dict key: {axis: size before compaction}}``, axes ``"0"`` /
    ``"1"``, sizes positive integers. ``name`` is the file, ``field`` where in it the record was found (both named
    in the error)."""
    where = f"{name!r}: {field}"
    if not isinstance(value, dict):
        raise UntrustedFileError(f"{where} must be a JSON object {{state_dict key: {{axis: size before compaction}}}}, "
                                 f"got {value!r:.200}")
    record: CompactedAxes = {}
    for key, axes in value.items():
        if not isinstance(axes, dict) or not all(
            axis in ("0", "1") and type(size) is int and size > 0 for axis, size in axes.items()
        ):
            raise UntrustedFileError(f"{where}: entry {key!r:.100} must map axes '0' / '1' to positive integer sizes "
                                     f"before compaction, got {axes!r:.100}")
        record[key] = {int(axis): size for axis, size in axes.items()}
    return record


def check_declared_shapes(
    name: str, declared: Mapping[str, Sequence[int]], model: nn.Module, record: Mapping[str, Mapping[int, int]] | None
) -> None:
    """The one rule (see the module docstring): refuse, naming ``name`` (the file) and the key, unless ``declared``
    (every ``state_dict`` key the file holds -> its shape) fits ``model`` under ``record`` (None: a file written
    without a record, by an older version: it may shrink nothing)."""
    expected = full_shapes(model)
    extra, missing = sorted(set(declared) - set(expected)), sorted(set(expected) - set(declared))
    if extra:
        raise UntrustedFileError(f"{name!r}, key {extra[0]!r}: is not in the model's state_dict (unexpected "
                                 f"{extra[:5]}): a file of another model ({type(model).__name__}: another depth or "
                                 "architecture?)")
    for key, axes in (record or {}).items():
        if key not in expected or any(axis >= min(2, len(expected[key])) for axis in axes):
            raise UntrustedFileError(f"{name!r}: {RECORD_KEY!r} lists {key!r} axes {sorted(axes)}; allowed: keys of "
                                     "the model's state_dict, axes 0 (units) and 1 (input columns) that it has")
        # a model built at the compacted size (the declared size equals its own) is that architecture: it loads
        held = tuple(declared.get(key, ()))
        other = {axis: size for axis, size in axes.items()
                 if size != expected[key][axis] and (len(held) <= axis or held[axis] != expected[key][axis])}
        if other:
            raise UntrustedFileError(f"{name!r}, key {key!r}: compacted from sizes {other} (axis: size), the model has "
                                     f"{list(expected[key])}: the compaction of a model of another configuration "
                                     f"(width, input size), not of this {type(model).__name__}")
    for key, shape in declared.items():
        model_shape, shrinkable = expected[key], set((record or {}).get(key, {}))
        shape = tuple(shape)
        fits = len(shape) == len(model_shape) and all(
            size <= limit if axis in shrinkable else size == limit
            for axis, (size, limit) in enumerate(zip(shape, model_shape))
        )
        if not fits:
            allowed = (f"axes {sorted(shrinkable)} (compacted) no larger than the model's, every other axis equal"
                       if shrinkable else "exactly the model's shape (the file records no compaction of this key)"
                       if record is not None else f"exactly the model's shape (the file has no {RECORD_KEY!r} "
                       "record of what compaction shrank: written by an older version? re-save it with this one)")
            raise UntrustedFileError(f"{name!r}, key {key!r}: declared shape {list(shape)}, the model has "
                                     f"{list(model_shape)}; allowed: {allowed}. A file of another model "
                                     f"configuration (width, input size, depth)?")
    if missing:
        raise UntrustedFileError(f"{name!r}, key {missing[0]!r}: of the model's state_dict is not in the file "
                                 f"(missing {missing[:5]}): a file of another model ({type(model).__name__}: another "
                                 "depth or architecture?)")


def declared_shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of a ``state_dict`` (tensors) or of a mapping of shapes."""
    return {key: tuple(value.shape) if isinstance(value, Tensor) else tuple(value) for key, value in state.items()}
