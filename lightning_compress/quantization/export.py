"""Save a quantized model to one safetensors file, and rebuild a working model from it. No pickle.

File layout (all keys of ``model.state_dict()`` are accounted for):

- a quantized weight ``<key>`` (e.g. ``net.1.weight``) is stored as ``<key>:qdata`` (8-bit: the ``int8`` /
  ``uint8`` codes in the weight's shape; fewer bits: the codes packed into a 1-D ``uint8`` stream, see
  :mod:`packing`), ``<key>:scale`` (``(rows, groups)``, float32 or float16) and, when asymmetric,
  ``<key>:zero_point`` (``uint8``, packed like the codes);
- every other entry (biases, norms, unquantized layers, buffers) is stored as it is in the state dict;
- a key that is the very same tensor as a quantized weight (tied weights) is stored as an alias only;
- the safetensors metadata holds one entry, ``"lightning_compress"``: a JSON string with the format version, the
  per-weight scheme (bits, granularity, group size, symmetric, shape, dtype) and the aliases.

The file is written to a temporary file in the target directory and moved into place with ``os.replace``, so a
crash never leaves a half-written file under the target name.

:func:`load_quantized` loads the file into a freshly constructed model of the same class: it dequantizes with the
same formula on the same codes and scales, so the weights are bit-identical to the in-memory quantized model.
With ``int_kernels=True`` it also swaps eligible ``nn.Linear`` layers for :class:`~.int_linear.Int8Linear`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.quantization.packing import pack, unpack
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec

FORMAT = "lightning-compress/quantized-safetensors"
VERSION = 1
METADATA_KEY = "lightning_compress"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encode_codes(codes: Tensor, bits: int, signed: bool) -> Tensor:
    return codes.contiguous() if bits == 8 else pack(codes, bits, signed=signed)


def _decode_codes(data: Tensor, bits: int, shape: tuple[int, ...], signed: bool) -> Tensor:
    if bits == 8:
        return data.reshape(shape)
    numel = 1
    for size in shape:
        numel *= size
    return unpack(data, bits, numel, signed=signed).reshape(shape)


def quantized_tensors(model: nn.Module, result: QuantizationResult) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the JSON-able metadata :func:`save_quantized` writes."""
    state = model.state_dict(keep_vars=True)
    by_key = {layer.key: layer for layer in result.layers.values()}
    missing = [key for key in by_key if key not in state]
    if missing:
        raise ValueError(f"`result` has weights {missing} that are not in the model's state_dict: wrong model?")
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
                "module": by_key[key].module,
                "type": by_key[key].module_type,
                "bits": qt.spec.bits,
                "granularity": qt.spec.granularity,
                "group_size": qt.spec.group_size,
                "symmetric": signed,
                "calibration": qt.spec.calibration,
                "shape": list(qt.shape),
                "dtype": _dtype_name(qt.dtype),
                "zero_point_shape": list(qt.scale.shape),
            }
        elif id(value) in quantized_ids:
            aliases[key] = quantized_ids[id(value)]
        else:
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # copies: no shared storage
    meta = {"format": FORMAT, "version": VERSION, "layers": layers_meta, "aliases": aliases}
    return tensors, meta


def atomic_save(tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, Any]) -> Path:
    """Write a safetensors file via a temporary file in the same directory and ``os.replace``."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def save_quantized(model: nn.Module, result: QuantizationResult, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` (quantized by :func:`~lightning_compress.quantize`, which returned ``result``) to ``path``."""
    tensors, meta = quantized_tensors(model, result)
    return atomic_save(tensors, path, meta)


def save_float(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the model's full-precision ``state_dict`` (the way back before quantizing), atomically."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    return atomic_save(state, path, {"format": "lightning-compress/float-safetensors", "version": VERSION})


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"`path` {str(path)!r} is not a lightning-compress quantized export (no {FORMAT!r} metadata)")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"`path` {str(path)!r} has format version {meta['version']}; this version reads <= {VERSION}")
    return meta


def load_quantized_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, QuantizedTensor]]:
    """The float entries and the :class:`QuantizedTensor` of each quantized weight, by state-dict key."""
    meta = read_metadata(path)
    floats: dict[str, Tensor] = {}
    raw: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            (raw if ":" in key else floats)[key] = handle.get_tensor(key)
    quantized: dict[str, QuantizedTensor] = {}
    for key, info in meta["layers"].items():
        spec = QuantSpec(
            bits=info["bits"],
            granularity=info["granularity"],
            group_size=info["group_size"],
            symmetric=info["symmetric"],
            calibration=info["calibration"],
            scale_dtype="float16" if raw[f"{key}:scale"].dtype == torch.float16 else "float32",
        )
        shape = tuple(info["shape"])
        q = _decode_codes(raw[f"{key}:qdata"], spec.bits, shape, spec.symmetric)
        zero = raw.get(f"{key}:zero_point")
        if zero is not None:
            zero = _decode_codes(zero, spec.bits, tuple(info["zero_point_shape"]), False)
        quantized[key] = QuantizedTensor(q, raw[f"{key}:scale"], zero, spec, shape, _DTYPES[info["dtype"]])
    for alias, key in meta.get("aliases", {}).items():
        floats[alias] = quantized[key].dequantize()
    return floats, quantized


def load_quantized(model: nn.Module, path: str | os.PathLike[str], *, int_kernels: bool = False) -> nn.Module:
    """Load ``path`` into ``model`` (a fresh instance of the class that was exported) and return it.

    Weights are the dequantized values, bit-identical to the quantized model that was saved; loading is strict
    (every key must match). ``int_kernels=True`` then replaces each ``nn.Linear`` whose codes fit int8 with one
    scale per output row (per_tensor / per_channel) by an :class:`~.int_linear.Int8Linear`; other layers keep
    the dequantized float weights.
    """
    floats, quantized = load_quantized_tensors(path)
    state = dict(floats)
    for key, qt in quantized.items():
        state[key] = qt.dequantize()
    model.load_state_dict(state, strict=True)
    if int_kernels:
        from lightning_compress.quantization.kernels import swap_int8_linear

        swap_int8_linear(model, quantized)
    return model
