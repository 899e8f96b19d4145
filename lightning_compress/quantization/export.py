"""Save a quantized model to one safetensors file, and rebuild a working model from it. No pickle.

File layout (all keys of ``model.state_dict()`` are accounted for):

- a quantized weight ``<key>`` (e.g. ``net.1.weight``) is stored as ``<key>:qdata`` (8-bit: the ``int8`` /
  ``uint8`` codes in the weight's shape; fewer bits: the codes packed into a 1-D ``uint8`` stream, see
  :mod:`packing`), ``<key>:scale`` (``(rows, groups)``, float32 or float16) and, when asymmetric,
  ``<key>:zero_point`` (``uint8``, packed like the codes);
- every other entry (biases, norms, unquantized layers, buffers) is stored as it is in the state dict;
- a key that is the very same tensor as a quantized weight (tied weights) is stored as an alias only;
- the safetensors metadata holds one entry, ``"lightning_compress"``: a JSON string with the format version, the
  per-weight scheme (bits, granularity, group size, symmetric, shape, dtype), the aliases and a ``run_id``.

Writing goes through :func:`lightning_compress.core.io.write_bytes`: a temporary file beside the target, fsync,
the user's umask, ``os.replace``; a killed export leaves the previous file, and its temporary file is removed by
the next successful export. ``save_quantized`` refuses a ``result`` that does not describe ``model`` (other layers,
other shapes, or weights that are not the result's dequantized codes).

The int8 export and its float copy (``save_float``, ``*.fp32.safetensors``) carry the same ``run_id`` when the
caller passes one to both; :func:`check_same_run` (or ``expect_run=`` on the loaders) tells files of different runs
apart.

Loading trusts nothing it reads: the safetensors header is checked against the file's size
(:func:`~lightning_compress.core.io.read_safetensors_header`), the metadata against its schema, every declared
dtype and shape against the metadata and against the model, all before any tensor is read; then scales must be
finite and positive and the dequantized weights finite. Each refusal is an
:class:`~lightning_compress.core.io.UntrustedFileError` (a ``ValueError``) naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from lightning_compress.core.io import SafetensorsHeader, UntrustedFileError, read_safetensors_header, write_bytes
from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.quantization.packing import pack, packed_nbytes, unpack
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec

FORMAT = "lightning-compress/quantized-safetensors"
FLOAT_FORMAT = "lightning-compress/float-safetensors"
VERSION = 1
METADATA_KEY = "lightning_compress"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
# metadata fields of a quantized layer and their JSON types (bool is not accepted where int is asked)
_LAYER_FIELDS: dict[str, type] = {"module": str, "type": str, "bits": int, "granularity": str, "group_size": int,
                                  "symmetric": bool, "calibration": str, "shape": list, "dtype": str,
                                  "zero_point_shape": list}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def new_run_id() -> str:
    """A fresh id to pass as ``run_id`` to both :func:`save_float` and :func:`save_quantized` of one run."""
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------- writing
def _encode_codes(codes: Tensor, bits: int, signed: bool) -> Tensor:
    return codes.contiguous() if bits == 8 else pack(codes, bits, signed=signed)


def _check_result(model: nn.Module, result: QuantizationResult, state: dict[str, Tensor]) -> None:
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


def quantized_tensors(
    model: nn.Module, result: QuantizationResult, run_id: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the JSON-able metadata :func:`save_quantized` writes."""
    state = model.state_dict(keep_vars=True)
    _check_result(model, result, state)
    by_key = {layer.key: layer for layer in result.layers.values()}
    quantized_ids = {id(state[key]): key for key in by_key}
    tensors: dict[str, Tensor] = {}
    layers_meta: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for key, value in state.items():
        if key in by_key:
            qt = by_key[key].qtensor
            signed = qt.spec.symmetric
            tensors[f"{key}:qdata"] = _encode_codes(qt.q.cpu(), qt.spec.bits, signed)
            tensors[f"{key}:scale"] = qt.scale.detach().cpu().contiguous()
            if qt.zero_point is not None:
                tensors[f"{key}:zero_point"] = _encode_codes(qt.zero_point.cpu(), qt.spec.bits, False)
            layers_meta[key] = {
                "module": by_key[key].module, "type": by_key[key].module_type, "bits": qt.spec.bits,
                "granularity": qt.spec.granularity, "group_size": qt.spec.group_size, "symmetric": signed,
                "calibration": qt.spec.calibration, "shape": list(qt.shape), "dtype": _dtype_name(qt.dtype),
                "zero_point_shape": list(qt.scale.shape),
            }
        elif id(value) in quantized_ids:
            aliases[key] = quantized_ids[id(value)]
        else:
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # copies: no shared storage
    meta = {"format": FORMAT, "version": VERSION, "layers": layers_meta, "aliases": aliases,
            "run_id": run_id or new_run_id()}
    return tensors, meta


def atomic_save(tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, Any]) -> Path:
    """Serialize to safetensors bytes and write them with :func:`~lightning_compress.core.io.write_bytes`."""
    data = save(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return write_bytes(path, data)


def save_quantized(
    model: nn.Module, result: QuantizationResult, path: str | os.PathLike[str], *, run_id: str | None = None
) -> Path:
    """Write ``model`` (quantized by :func:`~lightning_compress.quantize`, which returned ``result``) to ``path``.
    ``run_id``: the id shared with the run's float copy (:func:`save_float`); a fresh one when None."""
    tensors, meta = quantized_tensors(model, result, run_id)
    return atomic_save(tensors, path, meta)


def save_float(model: nn.Module, path: str | os.PathLike[str], *, run_id: str | None = None) -> Path:
    """Write the model's full-precision ``state_dict`` (the way back before quantizing), atomically."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FLOAT_FORMAT, "version": VERSION, "run_id": run_id or new_run_id()}
    return atomic_save(state, path, meta)


# ---------------------------------------------------------------------------- reading: metadata
def _parse_metadata(name: str, header: SafetensorsHeader, expected: str) -> dict[str, Any]:
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
    if version > VERSION:
        raise UntrustedFileError(f"`path` {name!r} has format version {version}; this version reads <= {VERSION}")
    if not isinstance(meta.get("run_id", ""), str):
        raise UntrustedFileError(f"{name!r}: metadata key 'run_id' must be a string, got {meta['run_id']!r:.100}")
    if expected == FORMAT:
        for field, kind_ in (("layers", dict), ("aliases", dict)):
            if not isinstance(meta.get(field, {}), kind_):
                raise UntrustedFileError(f"{name!r}: metadata key {field!r} must be a JSON object, got "
                                         f"{meta.get(field)!r:.100}")
        meta.setdefault("aliases", {})
        if "layers" not in meta:
            raise UntrustedFileError(f"{name!r}: metadata key 'layers' is missing")
        for key, info in meta["layers"].items():
            _layer_spec(name, key, info)
        for alias, target in meta["aliases"].items():
            if not isinstance(target, str) or target not in meta["layers"]:
                raise UntrustedFileError(f"{name!r}: alias {alias!r} points to {target!r:.100}, not a quantized weight")
    return meta


def _layer_spec(name: str, key: str, info: Any) -> tuple[QuantSpec, tuple[int, ...], tuple[int, int]]:
    """The layer's spec, weight shape and scale shape ``(rows, groups)``, from checked metadata."""
    where = f"{name!r}, layer {key!r}"
    if not isinstance(info, dict):
        raise UntrustedFileError(f"{where}: metadata must be a JSON object, got {info!r:.100}")
    for field, kind in _LAYER_FIELDS.items():
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
    if info["dtype"] not in _DTYPES:
        raise UntrustedFileError(f"{where}: metadata key 'dtype' must be one of {sorted(_DTYPES)}, got "
                                 f"{info['dtype']!r:.100}")
    rows, cols = shape[0], math.prod(shape[1:])
    if spec.granularity == "per_group" and cols % spec.group_size:
        raise UntrustedFileError(f"{where}: metadata 'group_size' {spec.group_size} does not divide {cols}")
    groups = {"per_tensor": (1, 1), "per_channel": (rows, 1)}.get(spec.granularity, (rows, cols // spec.group_size))
    if list(info["zero_point_shape"]) != list(groups):
        raise UntrustedFileError(f"{where}: metadata key 'zero_point_shape' must be {list(groups)} for "
                                 f"{spec.granularity} of {shape}, got {info['zero_point_shape']!r:.100}")
    return spec, tuple(shape), groups


def _expected_entries(name: str, meta: dict[str, Any]) -> dict[str, tuple[set[str], tuple[int, ...]]]:
    """Per ``<key>:qdata`` / ``:scale`` / ``:zero_point``: the allowed dtype codes and the exact shape."""
    expected: dict[str, tuple[set[str], tuple[int, ...]]] = {}
    for key, info in meta["layers"].items():
        spec, shape, groups = _layer_spec(name, key, info)
        numel, scales = math.prod(shape), groups[0] * groups[1]
        code = "I8" if spec.symmetric else "U8"
        expected[f"{key}:qdata"] = ({code}, shape) if spec.bits == 8 else ({"U8"}, (packed_nbytes(numel, spec.bits),))
        expected[f"{key}:scale"] = ({"F32", "F16"}, groups)
        if not spec.symmetric:
            packed = (packed_nbytes(scales, spec.bits),)
            expected[f"{key}:zero_point"] = ({"U8"}, groups if spec.bits == 8 else packed)
    return expected


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked metadata of a quantized export (see the module docstring). Reads no tensor."""
    name = os.fspath(path)
    return _parse_metadata(name, read_safetensors_header(name), FORMAT)


def read_run_id(path: str | os.PathLike[str]) -> str | None:
    """The ``run_id`` of a quantized export or a float copy (None for files written before run ids)."""
    name = os.fspath(path)
    header = read_safetensors_header(name)
    raw = header.metadata.get(METADATA_KEY, "")
    expected = FLOAT_FORMAT if FLOAT_FORMAT in raw else FORMAT
    return _parse_metadata(name, header, expected).get("run_id")


def check_same_run(quantized_path: str | os.PathLike[str], float_path: str | os.PathLike[str]) -> str:
    """Raise unless the quantized export and the float copy were written by the same run; returns the run id."""
    quantized, floats = read_run_id(quantized_path), read_run_id(float_path)
    if quantized is None or quantized != floats:
        raise UntrustedFileError(
            f"{os.fspath(quantized_path)!r} (run_id {quantized!r}) and {os.fspath(float_path)!r} (run_id {floats!r}) "
            "were not written by the same run: do not use them together"
        )
    return quantized


def _check_run(name: str, meta: dict[str, Any], expect_run: str | None) -> None:
    if expect_run is not None and meta.get("run_id") != expect_run:
        raise UntrustedFileError(f"{name!r}: run_id {meta.get('run_id')!r} is not the expected {expect_run!r}: a file "
                                 "of another run")


# ---------------------------------------------------------------------------- reading: declared tensors vs model
def _check_entries(name: str, header: SafetensorsHeader, meta: dict[str, Any] | None) -> None:
    """Every ``:``-suffixed entry is one a quantized layer needs, with the dtype and shape the metadata implies."""
    expected = _expected_entries(name, meta) if meta is not None else {}
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


def _check_against_model(name: str, header: SafetensorsHeader, meta: dict[str, Any] | None, model: nn.Module) -> None:
    """The file's keys, shapes and dtypes are exactly the model's ``state_dict``."""
    state = model.state_dict()
    layers = (meta or {}).get("layers", {})
    declared: dict[str, tuple[tuple[int, ...], str]] = {k: (e.shape, e.dtype) for k, e in header.tensors.items()
                                                         if ":" not in k}
    for key, info in layers.items():
        declared[key] = (tuple(info["shape"]), _CODES[_DTYPES[info["dtype"]]])
    for alias, target in (meta or {}).get("aliases", {}).items():
        declared[alias] = declared[target]
    extra, missing = sorted(set(declared) - set(state)), sorted(set(state) - set(declared))
    if extra or missing:
        key = (extra or missing)[0]
        where = "is not in the model's state_dict" if extra else "of the model's state_dict is not in the file"
        raise UntrustedFileError(f"{name!r}, key {key!r}: {where} (unexpected {extra[:5]}, missing {missing[:5]}): "
                                 f"a file of another model ({type(model).__name__})?")
    for key, (shape, code) in declared.items():
        value = state[key]
        if shape != tuple(value.shape) or code != _CODES.get(value.dtype, "?"):
            raise UntrustedFileError(f"{name!r}, key {key!r}: declared {code} {list(shape)}, the model has "
                                     f"{_CODES.get(value.dtype, value.dtype)} {list(value.shape)}")


# ---------------------------------------------------------------------------- reading: tensors
def _decode_codes(data: Tensor, bits: int, shape: tuple[int, ...], signed: bool) -> Tensor:
    if bits == 8:
        return data.reshape(shape)
    return unpack(data, bits, math.prod(shape), signed=signed).reshape(shape)


def load_quantized_tensors(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, expect_run: str | None = None
) -> tuple[dict[str, Tensor], dict[str, QuantizedTensor]]:
    """The float entries and the :class:`QuantizedTensor` of each quantized weight, by state-dict key. With
    ``model``, the file's keys, shapes and dtypes are checked against ``model.state_dict()`` before reading."""
    name = os.fspath(path)
    header = read_safetensors_header(name)
    meta = _parse_metadata(name, header, FORMAT)
    _check_run(name, meta, expect_run)
    _check_entries(name, header, meta)
    if model is not None:
        _check_against_model(name, header, meta, model)
    floats: dict[str, Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    with safe_open(name, framework="pt") as handle:
        for key in header.tensors:
            if ":" not in key:
                floats[key] = handle.get_tensor(key)
        for key, info in meta["layers"].items():
            spec, shape, groups = _layer_spec(name, key, info)
            scale = handle.get_tensor(f"{key}:scale")
            if not bool(scale.isfinite().all()) or not bool((scale > 0).all()):
                bad = scale[~(scale.isfinite() & (scale > 0))].reshape(-1)[:3].tolist()
                raise UntrustedFileError(f"{name!r}, key {key + ':scale'!r}: scales must be finite and > 0, got {bad}")
            spec = QuantSpec(spec.bits, spec.granularity, spec.group_size, spec.symmetric, spec.calibration,
                             scale_dtype="float16" if scale.dtype == torch.float16 else "float32")
            q = _decode_codes(handle.get_tensor(f"{key}:qdata"), spec.bits, shape, spec.symmetric)
            zero = None
            if not spec.symmetric:
                zero = _decode_codes(handle.get_tensor(f"{key}:zero_point"), spec.bits, groups, False)
            qt = QuantizedTensor(q, scale, zero, spec, shape, _DTYPES[info["dtype"]])
            if not bool(qt.dequantize().isfinite().all()):
                raise UntrustedFileError(f"{name!r}, key {key!r}: the dequantized weight overflows {info['dtype']}")
            quantized[key] = qt
    for alias, key in meta["aliases"].items():
        floats[alias] = quantized[key].dequantize()
    return floats, quantized


def load_quantized(
    model: nn.Module, path: str | os.PathLike[str], *, int_kernels: bool = False, expect_run: str | None = None
) -> nn.Module:
    """Load ``path`` into ``model`` (a fresh instance of the class that was exported) and return it.

    Weights are the dequantized values, bit-identical to the quantized model that was saved; the file must hold
    exactly the model's keys, shapes and dtypes (checked before anything is read). ``expect_run``: refuse a file
    whose ``run_id`` differs (e.g. ``read_run_id`` of the float copy). ``int_kernels=True`` then replaces each
    ``nn.Linear`` whose codes fit int8 with one scale per output row (per_tensor / per_channel) by an
    :class:`~.kernels.Int8Linear`; other layers keep the dequantized float weights.
    """
    floats, quantized = load_quantized_tensors(path, model, expect_run=expect_run)
    state = dict(floats)
    for key, qt in quantized.items():
        state[key] = qt.dequantize()
    model.load_state_dict(state, strict=True)
    if int_kernels:
        from lightning_compress.quantization.kernels import swap_int8_linear

        swap_int8_linear(model, quantized)
    return model


def load_float(model: nn.Module, path: str | os.PathLike[str], *, expect_run: str | None = None) -> nn.Module:
    """Load a float copy written by :func:`save_float` into ``model`` (keys, shapes, dtypes checked first).
    ``expect_run``: refuse a copy whose ``run_id`` differs (``read_run_id`` of the quantized export)."""
    name = os.fspath(path)
    header = read_safetensors_header(name)
    meta = _parse_metadata(name, header, FLOAT_FORMAT)
    _check_run(name, meta, expect_run)
    _check_entries(name, header, None)
    _check_against_model(name, header, None, model)
    with safe_open(name, framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in header.tensors}
    model.load_state_dict(state, strict=True)
    return model
