"""What a quantized export (or its float copy) may contain, checked without reading a tensor. No Lightning.

Used by :mod:`.export`: :func:`check_result` before writing (the result must describe the model), and on reading
:func:`parse_metadata` (the JSON metadata against its schema), :func:`check_entries` (each ``<key>:qdata`` /
``:scale`` / ``:zero_point`` has the dtype and shape the metadata implies, nothing else carries a ``:``) and
:func:`check_against_model` (the file's keys, shapes and dtypes are the model's ``state_dict``'s), or without a model
:func:`check_sparse_extent` (sparse layers declare no more positions than the file's size allows). Every refusal is
an :class:`~lightning_compress.core.io.UntrustedFileError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.io import SafetensorsHeader, UntrustedFileError
from lightning_compress.quantization import sparse_layout
from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.quantization.packing import packed_nbytes
from lightning_compress.quantization.primitives import QuantSpec
from lightning_compress.structure.shape_rules import RECORD_KEY, check_declared_shapes, parse_record

FORMAT = "lightning-compress/quantized-safetensors"
FLOAT_FORMAT = "lightning-compress/float-safetensors"
VERSION = 1  # what the export writes for a file whose layers are all stored dense, and for the float copy
SPARSE_VERSION = 2  # a file with a sparse layout (:mod:`.sparse_layout`); the newest version this reads
METADATA_KEY = "lightning_compress"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
ST_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}  # torch dtype -> safetensors dtype code
# metadata fields of a quantized layer and their JSON types (bool is not accepted where int is asked)
LAYER_FIELDS: dict[str, type] = {"module": str, "type": str, "bits": int, "granularity": str, "group_size": int,
                                  "symmetric": bool, "calibration": str, "shape": list, "dtype": str,
                                  "zero_point_shape": list}

def check_result(model: nn.Module, result: QuantizationResult, state: dict[str, Tensor]) -> None:
    """Refuse a ``result`` that does not describe ``model`` (the file would load into neither)."""
    if not isinstance(result, QuantizationResult):
        raise TypeError(f"`result` must be the QuantizationResult quantize() returned, got {type(result).__name__}")
    by_key = {layer.key: layer for layer in result.layers.values()}
    missing = [key for key in by_key if key not in state]
    if missing:
        raise ValueError(f"`result` has weights {missing} that are not in the model's state_dict: wrong model?")
    modules = dict(model.named_modules())
    for key, layer in by_key.items():
        qt, weight = layer.qtensor, state[key].detach()
        module = modules.get(layer.module)
        what = f"`result` layer {layer.module!r} ({key!r})"
        if module is None or type(module).__name__ != layer.module_type:
            got = "no such module" if module is None else type(module).__name__
            raise ValueError(f"{what} was a {layer.module_type} but `model` has {got} there: wrong model?")
        if tuple(weight.shape) != tuple(qt.shape) or tuple(qt.q.shape) != tuple(qt.shape) or weight.dtype != qt.dtype:
            raise ValueError(f"{what} is shaped {tuple(qt.shape)} ({qt.dtype}) but the model's weight is "
                             f"{tuple(weight.shape)} ({weight.dtype}): wrong model?")
        if not bool(qt.scale.isfinite().all()) or not bool((qt.scale > 0).all()):
            raise ValueError(f"{what} has non-finite or non-positive scales: nothing sound to export")
        if not torch.equal(qt.dequantize().to(weight.device), weight):
            raise ValueError(f"{what}: the model's weight is not the result's dequantized codes (another model, or "
                             "changed since quantize()); pass the model that quantize() returned `result` for")



# ---------------------------------------------------------------------------- reading: metadata
def parse_metadata(name: str, header: SafetensorsHeader, expected: str) -> dict[str, Any]:
    kind = "quantized export" if expected == FORMAT else "float copy"
    raw = header.metadata.get(METADATA_KEY)
    if raw is None:
        raise UntrustedFileError(f"`path` {name!r} is not a lightning-compress {kind} (no {expected!r} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UntrustedFileError(f"{name!r}: metadata {METADATA_KEY!r} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise UntrustedFileError(f"{name!r}: metadata {METADATA_KEY!r} must be a JSON object, got {raw!r:.200}")
    if meta.get("format") != expected:
        raise UntrustedFileError(f"`path` {name!r} is not a lightning-compress {kind} (format "
                                 f"{meta.get('format')!r:.100}, expected {expected!r})")
    version = meta.get("version")
    if type(version) is not int or version < 1:
        raise UntrustedFileError(f"{name!r}: metadata key 'version' must be a positive integer, got {version!r:.100}")
    if version > SPARSE_VERSION:
        raise UntrustedFileError(f"`path` {name!r} has format version {version}; this version reads <= "
                                 f"{SPARSE_VERSION}")
    if not isinstance(meta.get("run_id", ""), str):
        raise UntrustedFileError(f"{name!r}: metadata key 'run_id' must be a string, got {meta['run_id']!r:.100}")
    meta[RECORD_KEY] = (parse_record(name, meta[RECORD_KEY], f"metadata key {RECORD_KEY!r}") if RECORD_KEY in meta
                        else None)  # None: written before files recorded what compaction shrank
    if expected == FORMAT:
        for field, kind_ in (("layers", dict), ("aliases", dict)):
            if not isinstance(meta.get(field, {}), kind_):
                raise UntrustedFileError(f"{name!r}: metadata key {field!r} must be a JSON object, got "
                                         f"{meta.get(field)!r:.100}")
        meta.setdefault("aliases", {})
        if "layers" not in meta:
            raise UntrustedFileError(f"{name!r}: metadata key 'layers' is missing")
        for key, info in meta["layers"].items():
            layer_spec(name, key, info)
            if layout_of(name, key, info).kind != "dense" and version < SPARSE_VERSION:
                raise UntrustedFileError(f"{name!r}, layer {key!r}: metadata key 'layout' {info['layout']!r:.100} "
                                         f"needs format version {SPARSE_VERSION}, the file says {version}")
        for alias, target in meta["aliases"].items():
            if not isinstance(target, str) or target not in meta["layers"]:
                raise UntrustedFileError(f"{name!r}: alias {alias!r} points to {target!r:.100}, not a quantized weight")
    return meta


def layer_spec(name: str, key: str, info: Any) -> tuple[QuantSpec, tuple[int, ...], tuple[int, int]]:
    """The layer's spec, weight shape and scale shape ``(rows, groups)``, from checked metadata."""
    where = f"{name!r}, layer {key!r}"
    if not isinstance(info, dict):
        raise UntrustedFileError(f"{where}: metadata must be a JSON object, got {info!r:.100}")
    for field, kind in LAYER_FIELDS.items():
        value = info.get(field)
        if (type(value) is not kind) if kind in (int, bool) else not isinstance(value, kind):
            raise UntrustedFileError(f"{where}: metadata key {field!r} must be a {kind.__name__}, got {value!r:.100}")
    try:
        spec = QuantSpec(bits=info["bits"], granularity=info["granularity"], group_size=info["group_size"],
                         symmetric=info["symmetric"], calibration=info["calibration"])
    except (TypeError, ValueError) as err:
        raise UntrustedFileError(f"{where}: {err}") from None
    shape = info["shape"]
    if len(shape) < 2 or not all(type(s) is int and s > 0 for s in shape):
        raise UntrustedFileError(f"{where}: metadata key 'shape' must list 2+ positive integers, got {shape!r:.100}")
    if info["dtype"] not in DTYPES:
        raise UntrustedFileError(f"{where}: metadata key 'dtype' must be one of {sorted(DTYPES)}, got "
                                 f"{info['dtype']!r:.100}")
    rows, cols = shape[0], math.prod(shape[1:])
    if spec.granularity == "per_group" and cols % spec.group_size:
        raise UntrustedFileError(f"{where}: metadata 'group_size' {spec.group_size} does not divide {cols}")
    groups = {"per_tensor": (1, 1), "per_channel": (rows, 1)}.get(spec.granularity, (rows, cols // spec.group_size))
    if list(info["zero_point_shape"]) != list(groups):
        raise UntrustedFileError(f"{where}: metadata key 'zero_point_shape' must be {list(groups)} for "
                                 f"{spec.granularity} of {shape}, got {info['zero_point_shape']!r:.100}")
    return spec, tuple(shape), groups


def layout_of(name: str, key: str, info: dict[str, Any]) -> sparse_layout.Layout:
    """How the layer's codes are stored (:mod:`.sparse_layout`), from metadata :func:`layer_spec` accepted."""
    return sparse_layout.parse(name, key, info, math.prod(info["shape"]))


def expected_entries(name: str, meta: dict[str, Any]) -> dict[str, tuple[set[str], tuple[int, ...]]]:
    """Per ``<key>:qdata`` / ``:scale`` / ``:zero_point``: the allowed dtype codes and the exact shape."""
    expected: dict[str, tuple[set[str], tuple[int, ...]]] = {}
    for key, info in meta["layers"].items():
        spec, shape, groups = layer_spec(name, key, info)
        scales = groups[0] * groups[1]
        stored = sparse_layout.entries(layout_of(name, key, info), shape, spec.bits, spec.symmetric)
        expected.update({f"{key}:{suffix}": entry for suffix, entry in stored.items()})
        expected[f"{key}:scale"] = ({"F32", "F16"}, groups)
        if not spec.symmetric:
            packed = (packed_nbytes(scales, spec.bits),)
            expected[f"{key}:zero_point"] = ({"U8"}, groups if spec.bits == 8 else packed)
    return expected


def check_sparse_extent(name: str, meta: dict[str, Any], file_size: int) -> None:
    """Read without a model (whose shapes would bound the file's): the positions the sparse layers declare, all
    together, are at most :data:`~.sparse_layout.POSITIONS_PER_FILE_BYTE` per byte of the ``file_size``-byte file. A
    layer whose codes are all the fill code stores nothing but its metadata, so its declared shape is otherwise
    unbounded, and decoding it allocates a code per position and then its float weights."""
    sparse = {key: math.prod(info["shape"]) for key, info in meta["layers"].items()
              if layout_of(name, key, info).kind != "dense"}
    total, limit = sum(sparse.values()), sparse_layout.POSITIONS_PER_FILE_BYTE * file_size
    if total > limit:
        key = max(sparse, key=lambda k: sparse[k])
        raise UntrustedFileError(
            f"{name!r}, layer {key!r}: metadata key 'shape' {meta['layers'][key]['shape']} (stored "
            f"{meta['layers'][key]['layout']!r}): the sparse layers declare {total} positions in a {file_size}-byte "
            f"file; without a model at most {sparse_layout.POSITIONS_PER_FILE_BYTE} positions per byte of the file "
            f"({limit}) are read. A fully pruned layer of a file you trust: pass the model, which bounds the shapes "
            "(load_quantized(model, path), load_quantized_tensors(path, model), load_compressed(model, path))")



def check_run(name: str, meta: dict[str, Any], expect_run: str | None) -> None:
    if expect_run is not None and meta.get("run_id") != expect_run:
        raise UntrustedFileError(f"{name!r}: run_id {meta.get('run_id')!r} is not the expected {expect_run!r}: a file "
                                 "of another run")


# ---------------------------------------------------------------------------- reading: declared tensors vs model
def check_entries(name: str, header: SafetensorsHeader, meta: dict[str, Any] | None) -> None:
    """Every ``:``-suffixed entry is one a quantized layer needs, with the dtype and shape the metadata implies."""
    expected = expected_entries(name, meta) if meta is not None else {}
    for key, entry in header.tensors.items():
        if key in expected:
            codes, shape = expected[key]
            if entry.dtype not in codes or entry.shape != shape:
                raise UntrustedFileError(f"{name!r}, key {key!r}: declared {entry.dtype} {list(entry.shape)}, the "
                                         f"metadata implies {'/'.join(sorted(codes))} {list(shape)}")
        elif ":" in key:
            raise UntrustedFileError(f"{name!r}, key {key!r}: not a quantized weight of the metadata")
    absent = sorted(set(expected) - set(header.tensors))
    if absent:
        raise UntrustedFileError(f"{name!r}, key {absent[0]!r}: missing from the file (the metadata needs it)")
    for alias in (meta or {}).get("aliases", {}):
        if alias in header.tensors or alias in (meta or {}).get("layers", {}):
            raise UntrustedFileError(f"{name!r}, key {alias!r}: stored both as an alias and as a tensor")


def check_against_model(
    name: str, header: SafetensorsHeader, meta: dict[str, Any], model: nn.Module
) -> dict[str, tuple[int, ...]]:
    """The file's keys and dtypes are the model's ``state_dict``'s; its shapes follow the one shape rule
    (:func:`~lightning_compress.structure.shape_rules.check_declared_shapes`: equal, or smaller along the axes its
    compaction record lists). Returns every key's declared shape."""
    state = model.state_dict()
    layers = meta.get("layers", {})
    declared: dict[str, tuple[tuple[int, ...], str]] = {k: (e.shape, e.dtype) for k, e in header.tensors.items()
                                                         if ":" not in k}
    for key, info in layers.items():
        declared[key] = (tuple(info["shape"]), ST_CODES[DTYPES[info["dtype"]]])
    for alias, target in meta.get("aliases", {}).items():
        declared[alias] = declared[target]
    shapes = {key: shape for key, (shape, _) in declared.items()}
    check_declared_shapes(name, shapes, model, meta.get(RECORD_KEY))
    for key, (_, code) in declared.items():
        value = state[key]
        if code != ST_CODES.get(value.dtype, "?"):
            raise UntrustedFileError(f"{name!r}, key {key!r}: declared {code}, the model has "
                                     f"{ST_CODES.get(value.dtype, value.dtype)}: the loaders do not convert dtypes")
    return shapes
