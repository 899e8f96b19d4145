"""Sparse layouts of the export: chosen per layer only where smaller, read back bit-exactly by every loader (codes,
scales, zero points, the zeros of pruned weights), priced exactly without writing, and still exported to ONNX."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from torch import nn

from lightning_compress import export_onnx, load_compressed, quantize
from lightning_compress.core.io import UntrustedFileError
from lightning_compress.quantization import sparse_layout
from lightning_compress.quantization.export import (
    METADATA_KEY,
    SPARSE_VERSION,
    VERSION,
    load_quantized,
    load_quantized_tensors,
    read_metadata,
    save_quantized,
)
from lightning_compress.quantization.packing import pack, pack_codes, packed_nbytes
from lightning_compress.quantization.primitives import QuantSpec, quantize_tensor

SCHEMES = {"per_channel_sym": {"granularity": "per_channel"},
           "grouped_asym": {"granularity": "per_group", "group_size": 16, "symmetric": False}}
SPARSITIES = (0.0, 0.5, 0.9, 0.99, 1.0)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


def _pruned(sparsity: float) -> nn.Sequential:
    """``_net()`` with ``sparsity`` of each Linear's weights set to zero (random positions, seeded)."""
    model = _net()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight[torch.rand(layer.weight.shape, generator=generator) < sparsity] = 0
    return model


def _data_bytes(path: Path, key: str) -> int:
    """Bytes of every tensor the file stores for weight ``key`` (codes, positions, scales, zero points)."""
    with safe_open(str(path), framework="pt") as handle:
        return sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size()
                   for k in handle.keys() if k.startswith(f"{key}:"))


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_round_trip_is_bit_exact_and_the_predicted_bytes_are_the_bytes_written(
        tmp_path: Path, scheme: str, bits: int, sparsity: float) -> None:
    model = _pruned(sparsity)
    result = quantize(model, bits=bits, **SCHEMES[scheme])
    path = save_quantized(model, result, tmp_path / "m.safetensors")
    _, loaded = load_quantized_tensors(path, _net())
    for layer in result.layers.values():
        qt, back = layer.qtensor, loaded[layer.key]
        assert torch.equal(back.q, qt.q) and back.q.dtype == qt.q.dtype
        assert torch.equal(back.scale, qt.scale)
        assert (back.zero_point is None) == (qt.zero_point is None)
        if qt.zero_point is not None:
            assert torch.equal(back.zero_point, qt.zero_point)
        assert sparse_layout.nbytes(qt) == _data_bytes(path, layer.key)
    fresh = load_quantized(_net(), path)
    for key, value in model.state_dict().items():  # the zeros of the pruned weights included
        assert torch.equal(fresh.state_dict()[key], value), key
    layouts = {info.get("layout", "dense") for info in read_metadata(path)["layers"].values()}
    if sparsity == 0.0:
        assert layouts == {"dense"}  # nothing to gain: the file is the version-1 format, unchanged
    if sparsity >= 0.9:
        assert "dense" not in layouts


def test_the_layout_is_the_smallest_and_dense_unless_sparse_saves_more_than_its_header() -> None:
    """The sizes worked out by hand from the positions of the nonzero codes (a reference, not the module's code)."""
    weight = torch.randn(128, 256)
    numel = weight.numel()
    chosen = {}
    for sparsity in (0.0, 0.1, 0.6, 0.97, 1.0):
        pruned = weight * (torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) >= sparsity)
        qt = quantize_tensor(pruned, QuantSpec(bits=4))
        positions = [i for i, code in enumerate(qt.q.reshape(-1).tolist()) if code != 0]
        gaps = [b - a - 1 for a, b in zip([-1, *positions[:-1]], positions)]
        width = max(1, max(gaps, default=0).bit_length())
        kept = len(positions)
        sizes = {"dense": math.ceil(numel * 4 / 8), "bitmap": math.ceil(numel / 8) + math.ceil(kept * 4 / 8),
                 "gaps": math.ceil(kept * width / 8) + math.ceil(kept * 4 / 8)}
        best = min(("bitmap", "gaps"), key=sizes.__getitem__)
        expected = best if sizes["dense"] - sizes[best] > sparse_layout.HEADER_ALLOWANCE else "dense"
        layout = sparse_layout.choose(qt)
        assert (layout.kind, layout.kept) == (expected, kept if expected != "dense" else numel), (sparsity, sizes)
        assert sparse_layout.layout_nbytes(layout, numel, 4) == sizes[expected]
        chosen[sparsity] = layout.kind
    assert chosen == {0.0: "dense", 0.1: "dense", 0.6: "bitmap", 0.97: "gaps", 1.0: "gaps"}


def test_a_sparse_file_is_smaller_and_says_version_2(tmp_path: Path) -> None:
    dense_model, sparse_model = _pruned(0.0), _pruned(0.9)
    dense = save_quantized(dense_model, quantize(dense_model, bits=4), tmp_path / "d.safetensors")
    sparse = save_quantized(sparse_model, quantize(sparse_model, bits=4), tmp_path / "s.safetensors")
    assert read_metadata(dense)["version"] == VERSION == 1
    assert read_metadata(sparse)["version"] == SPARSE_VERSION == 2
    assert sparse.stat().st_size < 0.75 * dense.stat().st_size
    with safe_open(str(sparse), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
        info = meta["layers"]["0.weight"]
        assert info["layout"] == "gaps" and 0 < info["kept"] < 0.15 * 96 * 64
        assert handle.get_tensor("0.weight:qdata").numel() == packed_nbytes(info["kept"], 4)


def test_compressed_checkpoint_and_load_compressed_read_the_sparse_layout(tmp_path: Path) -> None:
    from lightning_compress.integration.compressed_checkpoint import pack, unpack

    model = _pruned(0.95)
    quantize(model, bits=3)
    checkpoint = {"lightning_compress": {"stage": "compressed"}, "state_dict": {}}
    pack(checkpoint, model)
    blob = checkpoint["lightning_compress"]["packed"]
    assert blob.numel() == len(save_quantized(copy.deepcopy(model), tmp_path / "m.safetensors").read_bytes())
    fresh = _net()
    state = unpack(fresh, checkpoint, "compressed.ckpt")
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    loaded = load_compressed(_net(), tmp_path / "m.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def _onnx_outputs(model: nn.Module, path: Path, x: torch.Tensor) -> torch.Tensor:
    export_onnx(model, path, x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_a_sparse_stored_model_exports_to_onnx_densified(tmp_path: Path) -> None:
    """The model loaded from a sparse file exports the same graph outputs as the quantized model it was saved from
    (ORT's dynamic int8 activations make both differ a little from PyTorch's float forward)."""
    model = _pruned(0.9).eval()
    quantize(model, bits=4)
    path = save_quantized(model, tmp_path / "m.safetensors")
    assert any("layout" in info for info in read_metadata(path)["layers"].values())
    loaded = load_quantized(_net(), path).eval()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    from_file, in_memory = _onnx_outputs(loaded, tmp_path / "f.onnx", x), _onnx_outputs(model, tmp_path / "m.onnx", x)
    assert torch.equal(from_file, in_memory)
    with torch.no_grad():
        expected = model(x)
    assert (from_file - expected).abs().max() < 0.02 * expected.abs().max()


def test_a_bitmap_with_padding_bits_set_is_refused() -> None:
    """60 x 31 = 1860 positions: the bitmap's last byte holds 4 of them and 4 padding bits, which must be zero."""
    qt = quantize_tensor(torch.randn(60, 31) * (torch.rand(60, 31) > 0.6), QuantSpec(bits=4))
    layout, stored = sparse_layout.encode(qt)
    if layout.kind != "bitmap":  # the writer's own choice; build the bitmap layout by hand otherwise
        positions = torch.nonzero(qt.q.reshape(-1)).reshape(-1)
        mask = torch.zeros(qt.q.numel(), dtype=torch.uint8)
        mask[positions] = 1
        layout = sparse_layout.Layout("bitmap", int(positions.numel()))
        stored = {"mask": pack(mask, 1, signed=False), "qdata": pack_codes(qt.q.reshape(-1)[positions], 4,
                                                                           signed=True)}
    decoded = sparse_layout.decode("f", "w", layout, stored.__getitem__, qt.spec, qt.shape, None)
    assert torch.equal(decoded, qt.q)
    stored["mask"] = stored["mask"].clone()
    stored["mask"][-1] |= 0x80
    with pytest.raises(UntrustedFileError, match=r"'f', key 'w:mask': the bitmap's padding bits after position 1860"):
        sparse_layout.decode("f", "w", layout, stored.__getitem__, qt.spec, qt.shape, None)
