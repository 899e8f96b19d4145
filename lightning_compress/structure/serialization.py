"""Saving a compacted model and loading it back into a freshly built instance. Pure PyTorch + safetensors.

A compacted ``state_dict`` has smaller shapes than the model class builds. :func:`save_compacted` writes a
safetensors file (no pickle) through :func:`lightning_compress.core.io.atomic_write`; tied parameters are stored
once and named as aliases in the metadata. :func:`load_compacted` reads the file's header first
(:func:`lightning_compress.core.io.read_safetensors_header`) and checks every declared tensor against the file and
the model *before allocating anything*: the header's length, each tensor's byte range (inside the file, matching its
shape), dtype (the model's tensor's: nothing is converted) and shape (same rank as the model's tensor, no dimension
larger: compaction only removes units), no key unknown to the model, none missing. Only then does it shrink the
model (:func:`shrink_to_state_dict`) and load the tensors strictly. Errors name the file and the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.io import UntrustedFileError, atomic_write, read_safetensors_header
from lightning_compress.structure.attention import (
    ATTENTION_TYPES,
    AttentionModule,
    PrunedMultiheadAttention,
    attention_layout,
)
from lightning_compress.structure.kinds import FOLLOWER_TYPES, PRODUCER_TYPES
from lightning_compress.structure.shape_rules import (
    RECORD_KEY,
    CompactedAxes,
    check_declared_shapes,
    compacted_axes,
    declared_shapes,
    encode,
    parse_record,
    record_compaction,
    shapes_of,
)

FORMAT = "lightning_compress.compacted/1"
_CODES = {  # torch dtype -> safetensors dtype code
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def save_compacted(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's tensors (with their compacted shapes) to a safetensors file, atomically, with the record of
    which axes compaction shrank (:mod:`.shape_rules`), which is all a loader lets the file shrink."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]  # a tied parameter: stored once
            continue
        seen[identity] = key
        tensors[key] = value.detach().cpu().contiguous()
    metadata = {"format": FORMAT, "aliases": json.dumps(aliases),
                RECORD_KEY: json.dumps(encode(compacted_axes(model)))}
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda handle: handle.write(data))


def load_compacted(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Shrink a freshly built ``model`` (same class and arguments as the one saved) to the shapes recorded by
    :func:`save_compacted` and load the tensors strictly. Returns ``model``; on a refusal it is untouched."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`path` {path!r} does not exist")
    shapes, aliases, record = _checked_header(model, path)
    shrink_to_state_dict(model, shapes, record, source=path)
    state = load_file(path)
    state.update({alias: state[key] for alias, key in aliases.items()})
    model.load_state_dict(state, strict=True)
    return model


def _checked_header(
    model: nn.Module, path: str
) -> tuple[dict[str, tuple[int, ...]], dict[str, str], CompactedAxes | None]:
    """The declared shapes, aliases and compaction record, every declaration checked against the file and the
    model (:func:`~.shape_rules.check_declared_shapes`)."""
    header = read_safetensors_header(path)  # the header itself: length, JSON, dtypes, shapes, byte ranges
    metadata = header.metadata
    if metadata.get("format") != FORMAT:
        raise UntrustedFileError(f"`path` {path!r} was not written by save_compacted (metadata 'format' "
                                 f"{metadata.get('format')!r:.100}, expected {FORMAT!r})")
    aliases = _json_field(path, metadata, "aliases", "{}")
    if not isinstance(aliases, dict) or not all(
        isinstance(alias, str) and isinstance(key, str) and key in header.tensors for alias, key in aliases.items()
    ):
        raise UntrustedFileError(f"{path!r}: metadata 'aliases' must map names to stored tensors, got "
                                 f"{metadata.get('aliases')!r:.200}")
    record = None
    if RECORD_KEY in metadata:
        record = parse_record(path, _json_field(path, metadata, RECORD_KEY, "{}"), f"metadata {RECORD_KEY!r}")
    expected = model.state_dict()
    for key, entry in header.tensors.items():
        if key in expected and entry.dtype != _CODES.get(expected[key].dtype):
            raise UntrustedFileError(f"{path!r} declares tensor {key!r} as {entry.dtype}, but the model's is "
                                     f"{_CODES.get(expected[key].dtype, expected[key].dtype)}: load_compacted does "
                                     "not convert dtypes")
    shapes = {key: entry.shape for key, entry in header.tensors.items()}
    shapes.update({alias: shapes[key] for alias, key in aliases.items()})
    check_declared_shapes(path, shapes, model, record)
    return shapes, aliases, record


def _json_field(path: str, metadata: dict[str, str], field: str, default: str) -> object:
    try:
        return json.loads(metadata.get(field, default))
    except ValueError:
        raise UntrustedFileError(f"{path!r}: metadata {field!r} is not valid JSON: "
                                 f"{metadata.get(field)!r:.200}") from None


def shrink_to_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor | Sequence[int]],
    record: Mapping[str, Mapping[int, int]] | None,
    *,
    source: str = "state_dict",
) -> nn.Module:
    """Resize ``model``'s Linear / Conv / BatchNorm layers and attention modules to the shapes their tensors have in
    ``state_dict`` (tensors, or shapes), new parameters zero-filled, to be overwritten by ``load_state_dict``.

    ``record`` is the compaction record of the file ``state_dict`` comes from (``source``, named in errors; None: a
    file that has none). Every shape is checked by :func:`~.shape_rules.check_declared_shapes` and the whole resize
    planned before anything changes: the model can only shrink along the recorded axes, and a refusal leaves it
    untouched. The model then carries the record of what was shrunk. Returns ``model``."""
    shapes = declared_shapes(state_dict)
    check_declared_shapes(source, shapes, model, record)
    before = shapes_of(model)
    resizes: list[tuple[nn.Module, dict[str, int], dict[str, tuple[int, ...]]]] = []
    attention: list[tuple[str, AttentionModule, int]] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = shapes.get(f"{prefix}weight")
        if isinstance(module, ATTENTION_TYPES) and f"{prefix}in_proj_weight" in shapes:
            rows, head_dim = shapes[f"{prefix}in_proj_weight"][0], attention_layout(module)[2]
            if rows % (3 * head_dim) or rows == 0:
                raise UntrustedFileError(f"{source!r}, key {prefix + 'in_proj_weight'!r}: {rows} rows, not a "
                                         f"positive multiple of 3 x head_dim {head_dim}")
            attention.append((name, module, rows // (3 * head_dim)))
        elif isinstance(module, PRODUCER_TYPES) and weight is not None:
            out, fan_in = weight[0], weight[1]
            sizes = ({"out_features": out, "in_features": fan_in} if isinstance(module, nn.Linear)
                     else {"out_channels": out, "in_channels": fan_in * module.groups})
            resizes.append((module, sizes, {"weight": weight, "bias": (out,)}))
        elif isinstance(module, FOLLOWER_TYPES):
            reference = weight if weight is not None else shapes.get(f"{prefix}running_mean")
            if reference is not None:
                names = ("weight", "bias", "running_mean", "running_var")
                resizes.append((module, {"num_features": reference[0]}, dict.fromkeys(names, reference)))
    for module, sizes, tensors in resizes:  # checked and planned: now change the model
        for attribute, size in sizes.items():
            setattr(module, attribute, size)
        for tensor_name, shape in tensors.items():
            _resize(module, tensor_name, shape)
    for name, module, heads in attention:
        if heads != attention_layout(module)[1] or isinstance(module, PrunedMultiheadAttention):
            new = PrunedMultiheadAttention.like(module, heads)
            new.out_proj = module.out_proj
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    for module in model.modules():  # Hugging Face style attention holding its head count
        query, head_size = getattr(module, "query", None), getattr(module, "attention_head_size", None)
        if isinstance(query, nn.Linear) and isinstance(head_size, int):
            heads = query.out_features // head_size
            # setattr: Module.__setattr__ is typed for tensors and modules only, these are plain ints
            setattr(module, "num_attention_heads", heads)  # noqa: B010
            if hasattr(module, "all_head_size"):
                setattr(module, "all_head_size", heads * head_size)  # noqa: B010
    record_compaction(model, before)
    return model


def _resize(module: nn.Module, name: str, shape: Sequence[int]) -> None:
    old = getattr(module, name, None)
    if isinstance(old, Tensor) and tuple(old.shape) != tuple(shape):
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(module, name, new)
