"""What a loaded file may say about the model's shapes: the model decides, the file may only shrink what compaction
shrank. Pure PyTorch, no Lightning.

Compaction (:func:`~lightning_compress.structure.compaction.compact`) removes units and so shrinks some axes of
some tensors: a producer's rows (axis 0 of its weight and bias, its BatchNorm followers' vectors, the rows of
``in_proj_weight``) and its consumers' input columns (axis 1). :func:`record_compaction` keeps on the model *which*
axes of *which* ``state_dict`` keys compaction shrank (a plain attribute, copied by ``copy.deepcopy``, not in the
``state_dict``); every writer (``save_compacted``, ``save_quantized``, ``save_float``, ``compressed.ckpt``) stores
it under :data:`RECORD_KEY`.

The rule (:func:`check_declared_shapes`), applied by every loader before the model is resized or any tensor is
allocated: a file holds exactly the model's keys; each declared shape has the model's rank; an axis the file's
record lists may be *smaller than or equal to* the model's, every other axis must *equal* the model's. So a file
can never grow the model, change its input size or its depth, and an 8 KiB file declaring a (20000, 20000) weight
is refused before anything is allocated. Refusals are :class:`~lightning_compress.core.io.UntrustedFileError`
naming the file, the key and both shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_compress.core.io import UntrustedFileError

RECORD_KEY = "compacted_axes"  # where files store the record: {state_dict key: [axes compaction shrank]}
ATTRIBUTE = "_lightning_compress_compacted_axes"

CompactedAxes = dict[str, tuple[int, ...]]


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every ``state_dict`` entry's shape."""
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def record_compaction(model: nn.Module, before: Mapping[str, Sequence[int]]) -> CompactedAxes:
    """Record on ``model`` the axes whose size changed since ``before`` (its shapes before compacting), added to
    any earlier record (compacting twice). Returns the whole record."""
    record = dict(compacted_axes(model))
    for key, shape in shapes_of(model).items():
        old = tuple(before.get(key, shape))
        changed = {axis for axis, (a, b) in enumerate(zip(old, shape)) if a != b} if len(old) == len(shape) else set()
        if changed:
            record[key] = tuple(sorted(changed | set(record.get(key, ()))))
    object.__setattr__(model, ATTRIBUTE, record)
    return dict(record)


def compacted_axes(model: nn.Module) -> CompactedAxes:
    """The record of :func:`record_compaction` (empty for a model never compacted)."""
    record = model.__dict__.get(ATTRIBUTE)
    return dict(record) if isinstance(record, dict) else {}


def encode(record: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """The record as JSON-able plain lists, keys sorted."""
    return {key: sorted(int(axis) for axis in axes) for key, axes in sorted(record.items())}


def parse_record(name: str, value: Any, field: str = RECORD_KEY) -> CompactedAxes:
    """A record read from a file, checked: an object mapping strings to lists of distinct non-negative integers.
    ``name`` is the file, ``field`` where in it the record was found (both named in the error)."""
    where = f"{name!r}: {field!r}"
    if not isinstance(value, dict):
        raise UntrustedFileError(f"{where} must be a JSON object {{state_dict key: [axes]}}, got {value!r:.200}")
    record: CompactedAxes = {}
    for key, axes in value.items():
        if (not isinstance(key, str) or not isinstance(axes, list) or len(set(axes)) != len(axes)
                or not all(type(axis) is int and axis >= 0 for axis in axes)):
            raise UntrustedFileError(f"{where}: entry {key!r:.100} must list distinct non-negative integer axes, "
                                     f"got {axes!r:.100}")
        record[key] = tuple(sorted(axes))
    return record


def check_declared_shapes(
    name: str, declared: Mapping[str, Sequence[int]], model: nn.Module, record: Mapping[str, Sequence[int]] | None
) -> None:
    """The one rule (see the module docstring): refuse, naming ``name`` (the file) and the key, unless ``declared``
    (every ``state_dict`` key the file holds -> its shape) fits ``model`` under ``record`` (None: a file written
    without a record, by an older version: it may shrink nothing)."""
    expected = shapes_of(model)
    extra, missing = sorted(set(declared) - set(expected)), sorted(set(expected) - set(declared))
    if extra:
        raise UntrustedFileError(f"{name!r}, key {extra[0]!r}: is not in the model's state_dict (unexpected "
                                 f"{extra[:5]}): a file of another model ({type(model).__name__}: another depth or "
                                 "architecture?)")
    for key, axes in (record or {}).items():
        if key not in expected or any(axis >= min(2, len(expected[key])) for axis in axes):
            raise UntrustedFileError(f"{name!r}: {RECORD_KEY!r} lists {key!r} axes {list(axes)}; allowed: keys of the "
                                     f"model's state_dict, axes 0 (units) and 1 (input columns) that it has")
    for key, shape in declared.items():
        model_shape, shrinkable = expected[key], set((record or {}).get(key, ()))
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
