"""Save a quantized model to one safetensors file, and rebuild a working model from it. No pickle.

File layout (all keys of ``model.state_dict()`` are accounted for):

- a quantized weight ``<key>`` (e.g. ``net.1.weight``) is stored as ``<key>:qdata`` (8-bit: the ``int8`` /
  ``uint8`` codes in the weight's shape; fewer bits: the codes packed into a 1-D ``uint8`` stream, see
  :mod:`packing`), ``<key>:scale`` (``(rows, groups)``, float32 or float16) and, when asymmetric,
  ``<key>:zero_point`` (``uint8``, packed like the codes);
- every other entry (biases, norms, unquantized layers, buffers) is stored as it is in the state dict;
- a key that is the very same tensor as a quantized weight (tied weights) is stored as an alias only;
- the safetensors metadata holds one entry, ``"lightning_compress"``: a JSON string with the format version, the
  per-weight scheme (bits, granularity, group size, symmetric, shape, dtype), the aliases and a ``run_id``; for a
  model that carries trained activation ranges (QAT with ``activations="int8"``), the versioned field
  ``"activations"`` (:mod:`.activation_ranges`), so :func:`load_quantized` of the file alone gives
  ``export_onnx(activations="static")`` the trained ranges.

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
finite and positive and the dequantized weights finite (the checks live in :mod:`.export_checks`). Each refusal is
an :class:`~lightning_compress.core.io.UntrustedFileError` (a ``ValueError``) naming the file and the key.
"""

from __future__ import annotations

import functools
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

from lightning_compress.core.io import UntrustedFileError, read_safetensors_header, write_bytes
from lightning_compress.quantization import export_checks as checks
from lightning_compress.quantization import sparse_layout
from lightning_compress.quantization.activation_ranges import METADATA_FIELD, metadata_entry, read_metadata_entry
from lightning_compress.quantization.carried import CarriedQuantization, attach, carried
from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.quantization.layer import LayerQuantization
from lightning_compress.quantization.packing import pack_codes, unpack_codes
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec
from lightning_compress.structure.serialization import shrink_to_state_dict
from lightning_compress.structure.shape_rules import RECORD_KEY, compacted_axes, encode

FORMAT, FLOAT_FORMAT, METADATA_KEY, VERSION = checks.FORMAT, checks.FLOAT_FORMAT, checks.METADATA_KEY, checks.VERSION
SPARSE_VERSION = checks.SPARSE_VERSION


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def new_run_id() -> str:
    """A fresh id to pass as ``run_id`` to both :func:`save_float` and :func:`save_quantized` of one run."""
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------- writing
def quantized_tensors(
    model: nn.Module, result: QuantizationResult, run_id: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the JSON-able metadata :func:`save_quantized` writes."""
    state = model.state_dict(keep_vars=True)
    checks.check_result(model, result, state)
    by_key = {layer.key: layer for layer in result.layers.values()}
    quantized_ids = {id(state[key]): key for key in by_key}
    tensors: dict[str, Tensor] = {}
    layers_meta: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for key, value in state.items():
        if key in by_key:
            qt = by_key[key].qtensor
            signed = qt.spec.symmetric
            layout, stored = sparse_layout.encode(qt)
            tensors.update({f"{key}:{suffix}": value for suffix, value in stored.items()})
            tensors[f"{key}:scale"] = qt.scale.detach().cpu().contiguous()
            if qt.zero_point is not None:
                tensors[f"{key}:zero_point"] = pack_codes(qt.zero_point.cpu(), qt.spec.bits, signed=False)
            layers_meta[key] = {
                "module": by_key[key].module, "type": by_key[key].module_type, "bits": qt.spec.bits,
                "granularity": qt.spec.granularity, "group_size": qt.spec.group_size, "symmetric": signed,
                "calibration": qt.spec.calibration, "shape": list(qt.shape), "dtype": _dtype_name(qt.dtype),
                "zero_point_shape": list(qt.scale.shape), **sparse_layout.describe(layout),
            }
        elif id(value) in quantized_ids:
            aliases[key] = quantized_ids[id(value)]
        else:
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # copies: no shared storage
    sparse = any("layout" in info for info in layers_meta.values())  # version 1 readers cannot read those
    meta = {"format": FORMAT, "version": SPARSE_VERSION if sparse else VERSION, "layers": layers_meta,
            "aliases": aliases, "run_id": run_id or new_run_id(), RECORD_KEY: encode(compacted_axes(model))}
    record = carried(model)
    ranges = {key: value for key, value in (record.activations if record else {}).items() if key in layers_meta}
    if ranges:  # the trained input ranges of the layers written quantized
        meta[METADATA_FIELD] = metadata_entry(ranges)
    return tensors, meta


def export_bytes(tensors: dict[str, Tensor], metadata: dict[str, Any]) -> bytes:
    """The safetensors bytes of an export (the file, or what ``compressed.ckpt`` packs)."""
    return save(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def atomic_save(tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, Any]) -> Path:
    """Serialize with :func:`export_bytes` and write them with :func:`~lightning_compress.core.io.write_bytes`."""
    return write_bytes(path, export_bytes(tensors, metadata))


def save_quantized(
    model: nn.Module,
    result: QuantizationResult | str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    run_id: str | None = None,
) -> Path:
    """Write ``model`` (quantized by :func:`~lightning_compress.quantize`, which returned ``result``) to ``path``.
    Without ``result`` (``save_quantized(model, path)``) the codes the model carries are written
    (:mod:`.carried`: set by ``quantize()``, the callback and :func:`load_quantized`). ``run_id``: the id shared
    with the run's float copy (:func:`save_float`); a fresh one when None."""
    if path is None and isinstance(result, (str, os.PathLike)):
        result, path = None, result
    if path is None:
        raise TypeError("save_quantized() needs `path`: save_quantized(model, path) or save_quantized(model, result, "
                        "path)")
    if result is None:
        result = _carried_result(model)
    if not isinstance(result, QuantizationResult):
        raise TypeError(f"`result` must be the QuantizationResult quantize() returned, a path, or None (the codes "
                        f"the model carries), got {type(result).__name__}")
    tensors, meta = quantized_tensors(model, result, run_id)
    return atomic_save(tensors, path, meta)


def _carried_result(model: nn.Module) -> QuantizationResult:
    """The codes ``model`` carries, as a :class:`QuantizationResult` to write; refused when it carries none or when
    its weights are no longer those codes."""
    record = carried(model)
    if record is None:
        raise ValueError(f"`model` ({type(model).__name__}) is not quantized: it carries no codes and no `result` "
                         "was given; allowed: a model returned by quantize() / load_quantized() or quantized by "
                         "PostTrainingQuantization, or pass `result`")
    stale = record.stale(model)
    if stale:
        raise ValueError(f"`model`'s weights {stale[:5]} are no longer the codes {record.source} left (trained, "
                         "restored to float or edited since): quantize it again before saving")
    return record_as_result(model, record)


def record_as_result(model: nn.Module, record: CarriedQuantization) -> QuantizationResult:
    """``record``'s codes as the :class:`QuantizationResult` the export writes (no check: the caller's)."""
    modules = dict(model.named_modules())
    layers = {}
    for key, qt in record.codes.items():
        module, _, attr = key.rpartition(".")
        layers[module] = LayerQuantization(module, attr, type(modules[module]).__name__, qt, math.nan, 0.0)
    return QuantizationResult(layers=layers)


def save_float(model: nn.Module, path: str | os.PathLike[str], *, run_id: str | None = None) -> Path:
    """Write the model's full-precision ``state_dict`` (the way back before quantizing), atomically."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FLOAT_FORMAT, "version": VERSION, "run_id": run_id or new_run_id(),
            RECORD_KEY: encode(compacted_axes(model))}
    return atomic_save(state, path, meta)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked metadata of a quantized export, consistent with the tensors the file declares (see the module
    docstring). Reads no tensor."""
    name = os.fspath(path)
    header = read_safetensors_header(name)
    meta = checks.parse_metadata(name, header, FORMAT)
    checks.check_entries(name, header, meta)
    return meta


def read_run_id(path: str | os.PathLike[str]) -> str | None:
    """The ``run_id`` of a quantized export or a float copy (None for files written before run ids)."""
    name = os.fspath(path)
    header = read_safetensors_header(name)
    raw = header.metadata.get(METADATA_KEY, "")
    expected = FLOAT_FORMAT if FLOAT_FORMAT in raw else FORMAT
    return checks.parse_metadata(name, header, expected).get("run_id")


def check_same_run(quantized_path: str | os.PathLike[str], float_path: str | os.PathLike[str]) -> str:
    """Raise unless the quantized export and the float copy were written by the same run; returns the run id."""
    quantized, floats = read_run_id(quantized_path), read_run_id(float_path)
    if quantized is None or quantized != floats:
        raise UntrustedFileError(
            f"{os.fspath(quantized_path)!r} (run_id {quantized!r}) and {os.fspath(float_path)!r} (run_id {floats!r}) "
            "were not written by the same run: do not use them together"
        )
    return quantized


# ---------------------------------------------------------------------------- reading: tensors
def _entry(handle: Any, key: str, suffix: str) -> Tensor:
    return handle.get_tensor(f"{key}:{suffix}")


def load_quantized_tensors(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, expect_run: str | None = None
) -> tuple[dict[str, Tensor], dict[str, QuantizedTensor]]:
    """The float entries and the :class:`QuantizedTensor` of each quantized weight, by state-dict key. With
    ``model``, the file's keys, shapes and dtypes are checked against ``model.state_dict()`` before reading; without
    it, sparse layers may declare at most :data:`~.sparse_layout.POSITIONS_PER_FILE_BYTE` positions per byte of the
    file (a fully pruned layer larger than that needs the model to load)."""
    _, floats, quantized = _read_checked(path, model, expect_run)
    return floats, quantized


def _read_checked(
    path: str | os.PathLike[str], model: nn.Module | None, expect_run: str | None
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, QuantizedTensor]]:
    name = os.fspath(path)
    header = read_safetensors_header(name)
    meta = checks.parse_metadata(name, header, FORMAT)
    checks.check_run(name, meta, expect_run)
    checks.check_entries(name, header, meta)
    if model is not None:
        checks.check_against_model(name, header, meta, model)
    else:  # nothing else bounds the shape of a layer whose codes are all the fill code
        checks.check_sparse_extent(name, meta, os.path.getsize(name))
    floats: dict[str, Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    with safe_open(name, framework="pt") as handle:
        for key in header.tensors:
            if ":" not in key:
                floats[key] = handle.get_tensor(key)
        for key, info in meta["layers"].items():
            spec, shape, groups = checks.layer_spec(name, key, info)
            scale = handle.get_tensor(f"{key}:scale")
            if not bool(scale.isfinite().all()) or not bool((scale > 0).all()):
                bad = scale[~(scale.isfinite() & (scale > 0))].reshape(-1)[:3].tolist()
                raise UntrustedFileError(f"{name!r}, key {key + ':scale'!r}: scales must be finite and > 0, got {bad}")
            spec = QuantSpec(spec.bits, spec.granularity, spec.group_size, spec.symmetric, spec.calibration,
                             scale_dtype="float16" if scale.dtype == torch.float16 else "float32")
            zero = None
            if not spec.symmetric:
                zero = unpack_codes(handle.get_tensor(f"{key}:zero_point"), spec.bits, groups, signed=False)
            read = functools.partial(_entry, handle, key)
            q = sparse_layout.decode(name, key, checks.layout_of(name, key, info), read, spec, shape, zero)
            qt = QuantizedTensor(q, scale, zero, spec, shape, checks.DTYPES[info["dtype"]])
            if not bool(qt.dequantize().isfinite().all()):
                raise UntrustedFileError(f"{name!r}, key {key!r}: the dequantized weight overflows {info['dtype']}")
            quantized[key] = qt
    for alias, key in meta["aliases"].items():
        floats[alias] = quantized[key].dequantize()
    return meta, floats, quantized


def load_quantized(
    model: nn.Module, path: str | os.PathLike[str], *, int_kernels: bool = False, expect_run: str | None = None
) -> nn.Module:
    """Load ``path`` into ``model`` (a fresh instance of the class that was exported) and return it.

    Weights are the dequantized values, bit-identical to the quantized model that was saved. The file must hold
    the model's keys and dtypes, and its shapes must be the model's, or smaller along the axes its compaction
    record lists (an export of a compacted model: the model is shrunk to them); all checked before any tensor is
    read, and the model is changed only once everything is. The model then carries its codes
    (:mod:`.carried`), so ``save_quantized(model, path)`` and ``export_onnx`` know it is quantized, and the trained
    activation ranges the file holds (checked as the rest), which ``export_onnx(activations="static")`` writes.
    ``expect_run``: refuse a file whose ``run_id`` differs (e.g. ``read_run_id`` of the float copy).
    ``int_kernels=True`` then replaces each ``nn.Linear`` whose codes fit int8 with one scale per output row
    (per_tensor / per_channel) by an :class:`~.kernels.Int8Linear`; other layers keep the dequantized float weights.
    """
    name = os.fspath(path)
    meta, floats, quantized = _read_checked(name, model, expect_run)
    ranges = read_metadata_entry(name, meta, set(quantized))  # checked before the model changes
    state = dict(floats)
    for key, qt in quantized.items():
        state[key] = qt.dequantize()
    shrink_to_state_dict(model, state, meta[RECORD_KEY], source=name)
    model.load_state_dict(state, strict=True)
    if int_kernels:
        from lightning_compress.quantization.kernels import swap_int8_linear

        swap_int8_linear(model, quantized)
    kept = model.state_dict()  # an Int8Linear holds its own codes; the layers that kept float carry them
    record = attach(model, {key: qt for key, qt in quantized.items() if key in kept}, f"load_quantized({name!r})")
    record.activations.update({key: value for key, value in ranges.items() if key in record.codes})
    return model


def load_float(model: nn.Module, path: str | os.PathLike[str], *, expect_run: str | None = None) -> nn.Module:
    """Load a float copy written by :func:`save_float` into ``model`` (keys, dtypes and the shape rule checked
    first, as in :func:`load_quantized`). ``expect_run``: refuse a copy whose ``run_id`` differs (``read_run_id``
    of the quantized export)."""
    name = os.fspath(path)
    header = read_safetensors_header(name)
    meta = checks.parse_metadata(name, header, FLOAT_FORMAT)
    checks.check_run(name, meta, expect_run)
    checks.check_entries(name, header, None)
    shapes = checks.check_against_model(name, header, meta, model)
    with safe_open(name, framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in header.tensors}
    shrink_to_state_dict(model, shapes, meta[RECORD_KEY], source=name)
    model.load_state_dict(state, strict=True)
    return model
