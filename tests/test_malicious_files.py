"""Files not to be trusted (issue 13): for every loader, crafted files with wrong shapes, dtypes, NaN scales, huge
declared sizes, bad JSON, missing keys, truncation. Each is refused with an error naming the file and the key,
before anything large is allocated (the huge cases run in a child process whose address space is capped)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_compress import load_compacted, quantize, save_compacted
from lightning_compress.core.io import UntrustedFileError
from lightning_compress.quantization import sparse_layout
from lightning_compress.quantization.export import (
    METADATA_KEY,
    load_float,
    load_quantized,
    load_quantized_tensors,
    read_metadata,
    save_float,
    save_quantized,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


SCHEMES = {"int4_group_asym": {"bits": 4, "granularity": "per_group", "group_size": 4, "symmetric": False},
           "int8_channel_sym": {"bits": 8}, "int8_tensor_asym": {"bits": 8, "granularity": "per_tensor",
                                                                  "symmetric": False}}


def _export(path: Path, scheme: str = "int4_group_asym") -> Path:
    model = _net()
    save_quantized(model, quantize(model, **SCHEMES[scheme]), path, run_id="r")
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def _rewrite(path: Path, tensors: Callable[[dict], None] | None = None, meta: Callable[[dict], Any] | None = None,
             raw_meta: str | None = None) -> Path:
    """Re-save ``path`` with its tensors and / or its JSON metadata changed in place by the callables."""
    values, metadata = _read(path)
    if tensors:
        tensors(values)
    if meta:
        parsed = json.loads(metadata[METADATA_KEY])
        parsed = meta(parsed) or parsed
        metadata[METADATA_KEY] = json.dumps(parsed)
    if raw_meta is not None:
        metadata[METADATA_KEY] = raw_meta
    save_file(values, str(path), metadata=metadata)
    return path


def _raw(path: Path, header: dict[str, Any], data: bytes, length: int | None = None) -> Path:
    """A safetensors file written by hand: 8-byte little-endian header length, JSON header, data."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _set(key: str, value: Any) -> Callable[[dict], None]:
    def change(values: dict) -> None:
        values[key] = value

    return change


def _drop(key: str) -> Callable[[dict], None]:
    return lambda values: values.pop(key)


def _layer(field: str, value: Any, key: str = "0.weight") -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        if value is _MISSING:
            meta["layers"][key].pop(field)
        else:
            meta["layers"][key][field] = value

    return change


_MISSING = object()


def _grow_to_4096(meta: dict) -> None:
    _layer("shape", [4096, 8])(meta)
    _layer("zero_point_shape", [4096, 1])(meta)
S, Z, Q = "0.weight:scale", "0.weight:zero_point", "0.weight:qdata"

# id, scheme, how to make the file bad (gets the path of a good export), texts the message must hold
QUANTIZED: list[tuple[str, str, Callable[[Path], Path], tuple[str, ...]]] = [
    ("scale_wrong_shape", "int4_group_asym", lambda p: _rewrite(p, _set(S, torch.ones(1, 1))), (S, "[12, 2]")),
    ("scale_all_nan", "int4_group_asym", lambda p: _rewrite(p, _set(S, torch.full((12, 2), math.nan))),
     (S, "finite", "nan")),
    ("scale_one_inf", "int8_channel_sym", lambda p: _rewrite(p, lambda v: v[S].view(-1).__setitem__(3, math.inf)),
     (S, "inf")),
    ("scale_zero", "int8_channel_sym", lambda p: _rewrite(p, _set(S, torch.zeros(12, 1))), (S, "> 0")),
    ("scale_negative", "int8_channel_sym", lambda p: _rewrite(p, _set(S, -torch.ones(12, 1))), (S, "-1.0")),
    ("scale_int_dtype", "int8_channel_sym", lambda p: _rewrite(p, _set(S, torch.ones(12, 1, dtype=torch.int32))),
     (S, "I32")),
    ("scale_huge_for_fp16_weight", "int8_channel_sym",
     lambda p: _rewrite(p, _set(S, torch.full((12, 1), 1e30)), _layer("dtype", "float16")), ("'0.weight'", "F16")),
    ("codes_float_dtype", "int8_channel_sym", lambda p: _rewrite(p, _set(Q, torch.zeros(12, 8))), (Q, "F32")),
    ("codes_unsigned_for_symmetric", "int8_channel_sym",
     lambda p: _rewrite(p, _set(Q, torch.zeros(12, 8, dtype=torch.uint8))), (Q, "U8", "I8")),
    ("codes_wrong_shape", "int8_channel_sym", lambda p: _rewrite(p, _set(Q, torch.zeros(8, 12, dtype=torch.int8))),
     (Q, "[8, 12]", "[12, 8]")),
    ("packed_codes_too_short", "int4_group_asym",
     lambda p: _rewrite(p, _set(Q, torch.zeros(47, dtype=torch.uint8))), (Q, "[47]", "[48]")),
    ("packed_codes_too_long", "int4_group_asym",
     lambda p: _rewrite(p, _set(Q, torch.zeros(4096, dtype=torch.uint8))), (Q, "[4096]")),
    ("zero_point_missing", "int4_group_asym", lambda p: _rewrite(p, _drop(Z)), (Z, "missing")),
    ("zero_point_in_symmetric_layer", "int8_channel_sym",
     lambda p: _rewrite(p, _set(Z, torch.zeros(12, 1, dtype=torch.uint8))), (Z, "not a quantized weight")),
    ("zero_point_wrong_shape", "int8_tensor_asym",
     lambda p: _rewrite(p, _set(Z, torch.zeros(12, 1, dtype=torch.uint8))), (Z, "[1, 1]")),
    ("unknown_suffix", "int8_channel_sym", lambda p: _rewrite(p, _set("0.weight:extra", torch.zeros(1))),
     ("0.weight:extra",)),
    ("bias_wrong_shape", "int8_channel_sym", lambda p: _rewrite(p, _set("0.bias", torch.zeros(13))),
     ("'0.bias'", "[13]", "[12]")),
    ("bias_wrong_dtype", "int8_channel_sym", lambda p: _rewrite(p, _set("0.bias", torch.zeros(12).double())),
     ("'0.bias'", "F64", "F32")),
    ("bias_missing", "int8_channel_sym", lambda p: _rewrite(p, _drop("2.bias")), ("'2.bias'", "not in the file")),
    ("layer_grown_to_4096_units", "int8_channel_sym",
     lambda p: _rewrite(p, lambda v: v.update({Q: torch.zeros(4096, 8, dtype=torch.int8), S: torch.ones(4096, 1)}),
                        _grow_to_4096),
     ("'0.weight'", "[4096, 8]", "[12, 8]")),
    ("metadata_bad_json", "int8_channel_sym", lambda p: _rewrite(p, raw_meta="{not json"),
     (METADATA_KEY, "not valid JSON")),
    ("metadata_not_an_object", "int8_channel_sym", lambda p: _rewrite(p, raw_meta="[1, 2]"), ("JSON object",)),
    ("metadata_absent", "int8_channel_sym", lambda p: save_file(_read(p)[0], str(p)) or p,
     ("not a lightning-compress quantized export",)),
    ("metadata_no_layers", "int8_channel_sym", lambda p: _rewrite(p, meta=lambda m: m.pop("layers") and m),
     ("'layers'", "missing")),
    ("metadata_layers_a_list", "int8_channel_sym", lambda p: _rewrite(p, meta=lambda m: {**m, "layers": []}),
     ("'layers'", "JSON object")),
    ("metadata_bits_missing", "int8_channel_sym", lambda p: _rewrite(p, meta=_layer("bits", _MISSING)),
     ("'0.weight'", "'bits'", "None")),
    ("metadata_bits_string", "int8_channel_sym", lambda p: _rewrite(p, meta=_layer("bits", "8")),
     ("'0.weight'", "'bits'", "'8'")),
    ("metadata_bits_twelve", "int8_channel_sym", lambda p: _rewrite(p, meta=_layer("bits", 12)),
     ("'0.weight'", "`bits`", "12")),
    ("metadata_symmetric_string", "int8_channel_sym", lambda p: _rewrite(p, meta=_layer("symmetric", "yes")),
     ("'0.weight'", "'symmetric'", "'yes'")),
    ("metadata_granularity_unknown", "int8_channel_sym", lambda p: _rewrite(p, meta=_layer("granularity", "rows")),
     ("'0.weight'", "granularity", "'rows'")),
    ("metadata_group_not_dividing", "int4_group_asym", lambda p: _rewrite(p, meta=_layer("group_size", 3)),
     ("'0.weight'", "group_size", "3")),
    ("metadata_dtype_unknown", "int8_channel_sym", lambda p: _rewrite(p, meta=_layer("dtype", "complex64")),
     ("'0.weight'", "'dtype'", "'complex64'")),
    ("metadata_shape_negative", "int8_channel_sym", lambda p: _rewrite(p, meta=_layer("shape", [-12, 8])),
     ("'0.weight'", "'shape'", "[-12, 8]")),
    ("metadata_alias_dangling", "int8_channel_sym",
     lambda p: _rewrite(p, meta=lambda m: {**m, "aliases": {"x.weight": "nowhere"}}), ("'x.weight'", "'nowhere'")),
    ("metadata_version_string", "int8_channel_sym", lambda p: _rewrite(p, meta=lambda m: {**m, "version": "1"}),
     ("'version'", "'1'")),
    ("metadata_other_format", "int8_channel_sym", lambda p: _rewrite(p, meta=lambda m: {**m, "format": "x"}),
     ("not a lightning-compress quantized export", "'x'")),
    ("metadata_run_id_number", "int8_channel_sym", lambda p: _rewrite(p, meta=lambda m: {**m, "run_id": 5}),
     ("'run_id'", "5")),
    ("truncated", "int8_channel_sym", lambda p: p.write_bytes(p.read_bytes()[:-40]) and p, ("data_offsets",)),
    ("truncated_in_header", "int8_channel_sym", lambda p: p.write_bytes(p.read_bytes()[:60]) and p, ("header",)),
    ("empty", "int8_channel_sym", lambda p: p.write_bytes(b"") or p, ("8-byte",)),
    ("header_bad_json", "int8_channel_sym", lambda p: p.write_bytes(struct.pack("<Q", 8) + b"{bad}   ") and p,
     ("not valid JSON",)),
    ("header_unknown_dtype", "int8_channel_sym",
     lambda p: _raw(p, {"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), ("'w'", "'F33'")),
    ("header_float_shape", "int8_channel_sym",
     lambda p: _raw(p, {"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, bytes(4)), ("'w'", "1.5")),
    ("header_offsets_disagree_with_shape", "int8_channel_sym",
     lambda p: _raw(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)), ("'w'", "8 bytes")),
]


@pytest.mark.parametrize(("scheme", "corrupt", "texts"), [c[1:] for c in QUANTIZED], ids=[c[0] for c in QUANTIZED])
def test_load_quantized_refuses(tmp_path: Path, scheme: str, corrupt: Callable[[Path], Path],
                                texts: tuple[str, ...]) -> None:
    path = corrupt(_export(tmp_path / "m.safetensors", scheme))
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_quantized(model, path)
    message = str(info.value)
    for text in (str(path), *texts):
        assert text in message, f"{text!r} missing from: {message}"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model was not touched


@pytest.mark.parametrize("case", ["metadata_bad_json", "metadata_bits_string", "metadata_no_layers", "truncated",
                                  "metadata_alias_dangling", "header_unknown_dtype"])
def test_read_metadata_refuses(tmp_path: Path, case: str) -> None:
    scheme, corrupt, _ = next(c[1:] for c in QUANTIZED if c[0] == case)
    path = corrupt(_export(tmp_path / "m.safetensors", scheme))
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.")):
        read_metadata(path)


FLOAT: list[tuple[str, Callable[[Path], Path], tuple[str, ...]]] = [
    ("wrong_shape", lambda p: _rewrite(p, _set("0.weight", torch.zeros(12, 9))), ("'0.weight'", "[12, 9]")),
    ("wrong_dtype", lambda p: _rewrite(p, _set("2.bias", torch.zeros(4, dtype=torch.float16))), ("'2.bias'", "F16")),
    ("missing_key", lambda p: _rewrite(p, _drop("2.weight")), ("'2.weight'",)),
    ("bad_json", lambda p: _rewrite(p, raw_meta="{"), ("not valid JSON",)),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-7]) and p, ("data_offsets",)),
    ("quantized_format", lambda p: _rewrite(p, meta=lambda m: {**m, "format": "lightning-compress/quantized"}),
     ("not a lightning-compress float copy",)),
]


@pytest.mark.parametrize(("corrupt", "texts"), [c[1:] for c in FLOAT], ids=[c[0] for c in FLOAT])
def test_load_float_refuses(tmp_path: Path, corrupt: Callable[[Path], Path], texts: tuple[str, ...]) -> None:
    path = tmp_path / "m.fp32.safetensors"
    save_float(_net(), path)
    corrupt(path)
    with pytest.raises(ValueError) as info:
        load_float(_net(), path)
    for text in (str(path), *texts):
        assert text in str(info.value), f"{text!r} missing from: {info.value}"


def _compacted(path: Path) -> Path:
    save_compacted(_net(), path)
    return path


COMPACTED: list[Any] = [  # pytest.param(corrupt, texts)
    pytest.param(lambda p: _raw_resave(p, "0.weight", torch.zeros(4096, 8)), ("'0.weight'", "4096"),
                 id="layer_grown_to_4096_units"),
    pytest.param(lambda p: _raw_resave(p, "0.weight", torch.zeros(96)), ("'0.weight'",), id="wrong_rank"),
    pytest.param(lambda p: _raw_resave(p, "0.bias", torch.zeros(12, dtype=torch.int64)), ("'0.bias'", "I64"),
                 id="wrong_dtype"),
    pytest.param(lambda p: _raw_resave(p, "9.weight", torch.zeros(1)), ("'9.weight'",), id="unknown_key"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-9]) and p, (), id="truncated"),
    pytest.param(lambda p: p.write_bytes(struct.pack("<Q", 8) + b"{bad}   ") and p, (), id="header_bad_json"),
    pytest.param(lambda p: _raw(p, {"__metadata__": {"format": "lightning_compress.compacted/1"},
                                    "0.weight": {"dtype": "F32", "shape": [12, 8], "data_offsets": [0, 384]}},
                                bytes(16)), ("'0.weight'",), id="declares_more_than_the_file"),
]


def _raw_resave(path: Path, key: str, value: torch.Tensor) -> Path:
    values, metadata = _read(path)
    values[key] = value
    save_file(values, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(("corrupt", "texts"), COMPACTED)
def test_load_compacted_refuses(tmp_path: Path, corrupt: Callable[[Path], Path], texts: tuple[str, ...]) -> None:
    path = corrupt(_compacted(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError) as info:
        load_compacted(_net(), path)
    for text in (str(path), *texts):
        assert text in str(info.value), f"{text!r} missing from: {info.value}"


# ---------------------------------------------------------------------------- huge declared sizes, capped memory
_CAPPED = textwrap.dedent("""
    import json, resource, struct, sys
    import torch
    from torch import nn
    from lightning_compress import load_compacted
    from lightning_compress.quantization.export import load_float, load_quantized, load_quantized_tensors, read_metadata

    def net():
        return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))

    loaders = {"load_quantized": lambda p: load_quantized(net(), p), "read_metadata": read_metadata,
               "load_float": lambda p: load_float(net(), p), "load_compacted": lambda p: load_compacted(net(), p),
               "load_quantized_tensors": load_quantized_tensors}
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (768 << 20), resource.RLIM_INFINITY))  # 768 MiB more, at most
    for name, path in json.loads(sys.argv[1]):
        try:
            loaders[name](path)
            print(json.dumps([name, path, "loaded", ""]))
        except Exception as err:  # the type and message are judged by the parent
            print(json.dumps([name, path, type(err).__name__, str(err)]))
""")


def _huge_files(tmp_path: Path) -> dict[str, Path]:
    """4 KiB files that declare 4 GiB tensors, consistently or not with their size."""
    gib4 = 1 << 32
    meta = {METADATA_KEY: json.dumps({"format": "lightning-compress/quantized-safetensors", "version": 1,
                                      "layers": {"0.weight": {"module": "0", "type": "Linear", "bits": 8,
                                                              "granularity": "per_channel", "group_size": 128,
                                                              "symmetric": True, "calibration": "minmax",
                                                              "shape": [1 << 16, 1 << 16], "dtype": "float32",
                                                              "zero_point_shape": [1 << 16, 1]}}, "aliases": {}})}
    files = {
        "declared_beyond_file": _raw(tmp_path / "a.safetensors", {"__metadata__": meta, "0.weight:qdata": {
            "dtype": "I8", "shape": [1 << 16, 1 << 16], "data_offsets": [0, gib4]}}, bytes(4096)),
        "metadata_shape_huge": _raw(tmp_path / "b.safetensors", {"__metadata__": meta, "0.weight:qdata": {
            "dtype": "I8", "shape": [64, 64], "data_offsets": [0, 4096]}}, bytes(4096)),
        "header_length_huge": tmp_path / "c.safetensors",
    }
    files["header_length_huge"].write_bytes(struct.pack("<Q", gib4) + b"{}" + bytes(4090))
    return files


def test_huge_declared_sizes_are_refused_without_allocating(tmp_path: Path) -> None:
    files = _huge_files(tmp_path)
    jobs = [(loader, str(path)) for path in files.values()
            for loader in ("load_quantized", "read_metadata", "load_float", "load_compacted")]
    out = subprocess.run([sys.executable, "-c", _CAPPED, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    results = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    assert len(results) == len(jobs)
    for loader, path, error, message in results:
        assert error in ("UntrustedFileError", "ValueError"), (loader, path, error, message)  # not MemoryError
        assert path in message, (loader, message)


# ---------------------------------------------------------------------------- sparse layouts (issue 23)
def _sparse_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


def _sparse_export(path: Path, sparsity: float, granularity: str = "per_channel") -> Path:
    """Layer 0 pruned to ``sparsity`` and stored sparse (0.6: a bitmap, 0.97: gaps), 4 bits per ``granularity``."""
    model = _sparse_net()
    with torch.no_grad():
        weight = model[0].weight
        weight[torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < sparsity] = 0
    save_quantized(model, quantize(model, bits=4, granularity=granularity), path, run_id="r")
    return path


def _bytes(key: str, change: Callable[[torch.Tensor], None]) -> Callable[[dict], None]:
    def edit(values: dict) -> None:
        change(values[key])

    return edit


M, G, SQ = "0.weight:mask", "0.weight:gaps", "0.weight:qdata"
_BITMAP, _GAPS = 0.6, 0.97

# id, sparsity of the export, how to make it bad, texts the message must hold
SPARSE: list[tuple[str, float, Callable[[Path], Path], tuple[str, ...]]] = [
    ("bitmap_one_bit_more", _BITMAP, lambda p: _rewrite(p, _bytes(M, lambda t: t.__setitem__(0, 255))),
     (M, "the bitmap marks", "'kept' says")),
    ("bitmap_all_set", _BITMAP, lambda p: _rewrite(p, _set(M, torch.full((768,), 255, dtype=torch.uint8))),
     (M, "the bitmap marks 6144")),
    ("bitmap_too_short", _BITMAP, lambda p: _rewrite(p, _set(M, torch.zeros(767, dtype=torch.uint8))), (M, "[767]")),
    ("bitmap_missing", _BITMAP, lambda p: _rewrite(p, _drop(M)), (M, "missing")),
    ("bitmap_float", _BITMAP, lambda p: _rewrite(p, _set(M, torch.zeros(768))), (M, "F32")),
    ("kept_codes_too_short", _BITMAP, lambda p: _rewrite(p, lambda v: v.update({SQ: v[SQ][:-1].clone()})),
     (SQ, "the metadata implies")),
    ("kept_beyond_the_weight", _BITMAP, lambda p: _rewrite(p, meta=_layer("kept", 6145)),
     ("'0.weight'", "'kept'", "[0, 6144]", "6145")),
    ("kept_a_string", _BITMAP, lambda p: _rewrite(p, meta=_layer("kept", "10")), ("'0.weight'", "'kept'", "'10'")),
    ("kept_negative", _GAPS, lambda p: _rewrite(p, meta=_layer("kept", -1)), ("'0.weight'", "'kept'", "-1")),
    ("layout_unknown", _BITMAP, lambda p: _rewrite(p, meta=_layer("layout", "csr")), ("'layout'", "'csr'")),
    ("layout_in_a_version_1_file", _BITMAP, lambda p: _rewrite(p, meta=lambda m: {**m, "version": 1}),
     ("'0.weight'", "'layout'", "version 2", "says 1")),
    ("kept_in_a_dense_layer", _BITMAP, lambda p: _rewrite(p, meta=_layer("kept", 10, "2.weight")),
     ("'2.weight'", "'kept'", "stored dense")),
    ("gap_bits_zero", _GAPS, lambda p: _rewrite(p, meta=_layer("gap_bits", 0)), ("'gap_bits'", "[1, 13]", "0")),
    ("gap_bits_40", _GAPS, lambda p: _rewrite(p, meta=_layer("gap_bits", 40)), ("'gap_bits'", "40")),
    ("gap_bits_wider_than_any_gap", _GAPS, lambda p: _rewrite(p, meta=_layer("gap_bits", 14)),
     ("'gap_bits'", "[1, 13]", "6144 positions", "14")),
    ("gap_bits_in_a_bitmap", _BITMAP, lambda p: _rewrite(p, meta=_layer("gap_bits", 3)), ("'gap_bits'", "'bitmap'")),
    ("gaps_beyond_the_weight", _GAPS, lambda p: _rewrite(p, _bytes(G, lambda t: t.fill_(255))),
     (G, "beyond the weight's 6144 positions")),
    ("gaps_and_a_mask", _GAPS, lambda p: _rewrite(p, _set(M, torch.zeros(768, dtype=torch.uint8))),
     (M, "not a quantized weight")),
    ("gaps_missing", _GAPS, lambda p: _rewrite(p, _drop(G)), (G, "missing")),
]


@pytest.mark.parametrize(("sparsity", "corrupt", "texts"), [c[1:] for c in SPARSE], ids=[c[0] for c in SPARSE])
def test_load_quantized_refuses_a_bad_sparse_layout(tmp_path: Path, sparsity: float, corrupt: Callable[[Path], Path],
                                                    texts: tuple[str, ...]) -> None:
    good = _sparse_export(tmp_path / "good.safetensors", sparsity)
    layout = "bitmap" if sparsity == _BITMAP else "gaps"
    assert json.loads(_read(good)[1][METADATA_KEY])["layers"]["0.weight"]["layout"] == layout
    load_quantized(_sparse_net(), good)  # the file before corruption loads
    path = corrupt(good)
    model = _sparse_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UntrustedFileError) as info:
        load_quantized(model, path)
    for text in (str(path), *texts):
        assert text in str(info.value), f"{text!r} missing from: {info.value}"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- sparse layouts declaring huge shapes
HUGE = [60000, 60000]  # 3.6e9 positions: a code each, then 4 bytes of float weight each


def _as_bitmap(path: Path) -> Path:
    """A gaps layer with no code kept, restated as a bitmap (the writer never picks one for kept=0)."""
    def meta(parsed: dict) -> None:
        _layer("layout", "bitmap")(parsed)
        _layer("gap_bits", _MISSING)(parsed)

    return _rewrite(path, lambda v: v.update({M: torch.zeros(768, dtype=torch.uint8)}) or v.pop(G), meta)


# id, sparsity of layer 0 (per_tensor: one scale, so nothing but the layout bounds the shape), extra edit, layout
HUGE_SPARSE: list[tuple[str, float, Callable[[Path], Path], str]] = [
    ("gaps_kept_0", 1.0, lambda p: p, "gaps"),
    ("gaps_kept_some", _GAPS, lambda p: p, "gaps"),
    ("bitmap_kept_0", 1.0, _as_bitmap, "bitmap"),
    ("bitmap_kept_some", _BITMAP, lambda p: p, "bitmap"),
]


def _huge_sparse(tmp_path: Path, case: str) -> Path:
    _, sparsity, edit, layout = next(c for c in HUGE_SPARSE if c[0] == case)
    path = edit(_sparse_export(tmp_path / f"{case}.safetensors", sparsity, "per_tensor"))
    info = json.loads(_read(path)[1][METADATA_KEY])["layers"]["0.weight"]
    assert info["layout"] == layout and (info["kept"] == 0) == (sparsity == 1.0), info
    path = _rewrite(path, meta=_layer("shape", HUGE))
    assert path.stat().st_size < 32 << 10
    return path


@pytest.mark.parametrize("case", [c[0] for c in HUGE_SPARSE])
def test_a_sparse_layer_declaring_a_huge_shape_is_refused_before_decoding(tmp_path: Path, case: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = _huge_sparse(tmp_path, case)

    def never(*args: Any) -> None:
        raise AssertionError("fill_codes reached: the declared shape was not checked first")

    monkeypatch.setattr(sparse_layout, "fill_codes", never)
    with pytest.raises(UntrustedFileError) as info:
        load_quantized_tensors(path)  # no model to bound the shape
    texts = ("pass the model", "3600000000", "'shape'") if case.startswith("gaps") else (M, "the metadata implies")
    for text in (str(path), "'0.weight", *texts):
        assert text in str(info.value), f"{text!r} missing from: {info.value}"
    model = _sparse_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UntrustedFileError, match=r"0\.weight"):
        load_quantized(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sparse_layers_declaring_huge_shapes_are_refused_in_capped_memory(tmp_path: Path) -> None:
    jobs = [("load_quantized_tensors", str(_huge_sparse(tmp_path, case))) for case, *_ in HUGE_SPARSE]  # no model
    out = subprocess.run([sys.executable, "-c", _CAPPED, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    results = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    assert len(results) == len(jobs)
    for loader, path, error, message in results:
        assert error == "UntrustedFileError", (loader, path, error, message)  # not MemoryError
        assert path in message and "0.weight" in message, (loader, message)


def _pruned_square(path: Path, sparsity: float) -> tuple[nn.Module, Path]:
    """A 1024 x 1024 layer pruned to ``sparsity``, 2 bits per tensor: the most positions per byte the writer gives."""
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    with torch.no_grad():
        weight = model[0].weight
        weight[torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < sparsity] = 0
    save_quantized(model, quantize(model, bits=2, granularity="per_tensor"), path, run_id="r")
    return model, path


def test_the_writers_sparsest_files_load_without_the_model_up_to_the_documented_bound(tmp_path: Path) -> None:
    small = _sparse_export(tmp_path / "small.safetensors", 1.0, "per_tensor")  # every code of layer 0 the fill code
    assert json.loads(_read(small)[1][METADATA_KEY])["layers"]["0.weight"]["kept"] == 0
    codes = load_quantized_tensors(small)[1]["0.weight"]
    assert torch.equal(codes.q, torch.zeros(96, 64, dtype=torch.int8))
    model, sparse = _pruned_square(tmp_path / "sparse.safetensors", 0.9995)  # one code per ~2000 positions
    assert 1024 * 1024 > sparse.stat().st_size * sparse_layout.POSITIONS_PER_FILE_BYTE / 2  # near the bound
    assert torch.equal(load_quantized_tensors(sparse)[1]["0.weight"].dequantize(), model[0].weight)
    model, pruned = _pruned_square(tmp_path / "pruned.safetensors", 1.0)  # beyond the bound: the model bounds it
    assert json.loads(_read(pruned)[1][METADATA_KEY])["layers"]["0.weight"]["kept"] == 0
    with pytest.raises(UntrustedFileError, match="pass the model"):
        load_quantized_tensors(pruned)
    assert not load_quantized_tensors(pruned, model)[1]["0.weight"].q.any()
    fresh = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    assert not load_quantized(fresh, pruned)[0].weight.any()


# --------------------------------------------------------------------------- trained activation ranges (QAT int8)
def _ranges(value: Any) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        meta["activations"] = value

    return change


GOOD_RANGES = {"version": 1, "ranges": {"0.weight": [0.05, 0], "2.weight": [0.125, 128]}}

# id, the metadata field "activations" the file declares, texts the message must hold
ACTIVATION_RANGES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("not_a_dict", [0.1, 0], ("'activations'", "'version'")),
    ("no_version", {"ranges": {}}, ("'activations'", "'version'")),
    ("extra_field", {**GOOD_RANGES, "scales": {}}, ("'activations'",)),
    ("newer_version", {**GOOD_RANGES, "version": 2}, ("'activations'", "version 2", "reads 1..1")),
    ("version_string", {**GOOD_RANGES, "version": "1"}, ("version '1'",)),
    ("ranges_list", {"version": 1, "ranges": [[0.1, 0]]}, ("activation ranges must be a dict, got list",)),
    ("unknown_key", {"version": 1, "ranges": {"9.weight": [0.1, 0]}}, ("'9.weight'", "not a quantized weight")),
    ("float_key", {"version": 1, "ranges": {"0.bias": [0.1, 0]}}, ("'0.bias'", "not a quantized weight")),
    ("scale_zero", {"version": 1, "ranges": {"0.weight": [0.0, 0]}}, ("'0.weight'", "finite number > 0, got 0.0")),
    ("scale_nan", {"version": 1, "ranges": {"0.weight": [math.nan, 0]}}, ("'0.weight'", "got nan")),
    ("scale_string", {"version": 1, "ranges": {"0.weight": ["0.1", 0]}}, ("'0.weight'", "got '0.1'")),
    ("zero_point_256", {"version": 1, "ranges": {"0.weight": [0.1, 256]}}, ("integer in 0..255, got 256",)),
    ("zero_point_float", {"version": 1, "ranges": {"0.weight": [0.1, 1.5]}}, ("integer in 0..255, got 1.5",)),
    ("pair_short", {"version": 1, "ranges": {"0.weight": [0.1]}}, ("[scale, zero_point]",)),
    ("scale_huge_integer", {"version": 1, "ranges": {"0.weight": [10**400, 0]}},
     ("'0.weight'", "finite number > 0, got 1000")),  # float(10**400) overflows: OverflowError is not a ValueError
]


@pytest.mark.parametrize(("value", "texts"), [c[1:] for c in ACTIVATION_RANGES], ids=[c[0] for c in ACTIVATION_RANGES])
def test_load_quantized_refuses_bad_activation_ranges(tmp_path: Path, value: Any, texts: tuple[str, ...]) -> None:
    """The export's trained activation ranges (QAT, activations="int8") are read as untrusted, before the model
    changes: a versioned field, each range of a quantized weight, a finite scale > 0, a zero point in 0..255."""
    test_load_quantized_refuses(tmp_path, "int8_channel_sym", lambda p: _rewrite(p, meta=_ranges(value)), texts)


def test_well_formed_activation_ranges_are_carried_by_the_loaded_model(tmp_path: Path) -> None:
    from lightning_compress.quantization.carried import carried

    path = _rewrite(_export(tmp_path / "m.safetensors", "int8_channel_sym"), meta=_ranges(GOOD_RANGES))
    record = carried(load_quantized(_net(), path))
    assert record is not None and record.activations == {"0.weight": (0.05, 0), "2.weight": (0.125, 128)}
