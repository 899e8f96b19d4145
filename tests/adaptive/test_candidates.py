"""Candidates: exact bytes as the export writes them (the whole file predicted to the byte, header read from it),
sparsity priced in the bytes of the sparse layout the export writes, pruning by F * w^2. Random tensors: these are
shape / accounting tests."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

from lightning_compress.adaptive import Budget, compress
from lightning_compress.adaptive.candidates import SPARSITIES, layer_candidates, prune, realise
from lightning_compress.adaptive.costs import fixed_bytes
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.quantization import load_quantized, quantize, save_quantized


class TinyLM(nn.Module):
    """Embedding -> MultiheadAttention -> LayerNorm -> Linear -> head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        x = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.head(torch.relu(self.mid(x)))


def _batches() -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (4, 12), generator=generator) for _ in range(3)]


def _header(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


@pytest.mark.parametrize("size", [0.3, 0.45, 0.7])
def test_predicted_bytes_equal_the_file_written(tmp_path: Path, size: float) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    keys = {"emb": "emb.weight", "attn": "attn.in_proj_weight", "mid": "mid.weight", "attn.out_proj":
            "attn.out_proj.weight"}
    fixed = fixed_bytes(model, keys)
    result = compress(model, Budget(size=size), _batches())
    path = save_quantized(model, tmp_path / "m.safetensors")
    on_disk = path.stat().st_size
    assert result.file_bytes == on_disk <= result.budget_bytes
    assert {row["layer"] for row in result.plan} == set(keys)  # the tied head is the embedding's weight
    assert fixed + sum(row["bytes"] for row in result.plan) + _header(path) == on_disk
    again = load_quantized(TinyLM(), path)
    ids = _batches()[0]
    assert torch.equal(again(ids), model(ids))


def test_a_tied_weight_kept_float_is_counted_twice() -> None:
    model = TinyLM()
    fisher = torch.ones_like(model.emb.weight)
    options = layer_candidates("emb", model.emb, model.emb.weight, fisher, 0.0, aliases=1, calibration="minmax")
    floats = [c for c in options if c.bits == FLOAT_BITS]
    assert floats and all(c.nbytes == 2 * model.emb.weight.numel() * 4 for c in floats)
    assert all(c.macs == 0 for c in options)  # a lookup multiplies nothing


def test_sparsity_is_priced_in_the_bytes_of_the_layout_the_export_writes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(256, 64)
    fisher = torch.rand_like(layer.weight)
    options = layer_candidates("l", layer, layer.weight, fisher, 3.0, aliases=0, calibration="minmax")
    by_format: dict[tuple[int, str | None, int | None], dict[float, tuple[int, int, float]]] = {}
    for c in options:
        by_format.setdefault((c.bits, c.granularity, c.group_size), {})[c.sparsity] = (c.nbytes, c.macs, c.score)
    assert len(by_format) == 1 + 5 * 3  # float; 5 widths x (per channel, g32, g128)
    for (bits, _, _), per_sparsity in by_format.items():
        assert sorted(per_sparsity) == sorted(SPARSITIES)
        sizes = [per_sparsity[s][0] for s in sorted(per_sparsity)]
        macs = [per_sparsity[s][1] for s in sorted(per_sparsity)]
        assert macs == sorted(macs, reverse=True) and macs[0] == 256 * 64 * 3
        if bits == FLOAT_BITS:
            assert len(set(sizes)) == 1  # float weights are stored dense: pruning saves MACs only
        else:
            assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]  # 90 %: a sparse layout pays
    assert by_format[(FLOAT_BITS, None, None)][0.0][2] == 0.0
    assert by_format[(4, "per_channel", None)][0.0][0] == 256 * 64 // 2 + 64 * 4  # packed codes + fp32 scales
    # the price is the file's: each 4-bit per-channel candidate written alone, its weight's tensors read back
    for sparsity in SPARSITIES:
        candidate = next(c for c in options if (c.bits, c.granularity, c.sparsity) == (4, "per_channel", sparsity))
        model = nn.Sequential(nn.Linear(256, 64))
        _, qtensor = realise(layer.weight, fisher, candidate, "minmax")
        assert qtensor is not None
        result = quantize(model, bits=4)
        layer_result = result.layers["0"]
        with torch.no_grad():
            model[0].weight.copy_(qtensor.dequantize())
        layer_result.qtensor = qtensor
        path = save_quantized(model, result, tmp_path / f"{sparsity}.safetensors")
        with safe_open(str(path), framework="pt") as handle:
            stored = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size()
                         for k in handle.keys() if k.startswith("0.weight:"))
        assert stored == candidate.nbytes, sparsity


def test_prune_removes_the_lowest_fisher_weighted_saliency() -> None:
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    fisher = torch.tensor([[10.0, 0.01, 1.0, 100.0]])  # saliency F * w^2: 10, 0.04, 9, 25
    pruned = prune(weight, fisher, 0.5)
    assert pruned.tolist() == [[1.0, 0.0, 0.0, 0.5]]
    assert weight.tolist() == [[1.0, -2.0, 3.0, 0.5]]  # a new tensor: the float weight is untouched


def test_the_floor_is_below_every_plan_and_reached_by_an_all_zero_model() -> None:
    from lightning_compress.adaptive.plan import floor_bytes

    torch.manual_seed(0)
    model = TinyLM()
    layers = {"emb": model.emb, "attn": model.attn, "mid": model.mid, "attn.out_proj": model.attn.out_proj}
    weights = {"emb": model.emb.weight, "attn": model.attn.in_proj_weight, "mid": model.mid.weight,
               "attn.out_proj": model.attn.out_proj.weight}

    def cheapest() -> int:
        return sum(min(c.nbytes for c in layer_candidates(n, layers[n], w, torch.ones_like(w), 1.0, 0, "minmax"))
                   for n, w in weights.items())

    assert floor_bytes(weights, 123) < 123 + cheapest()
    with torch.no_grad():
        for weight in weights.values():
            weight.zero_()
    assert floor_bytes(weights, 123) == 123 + cheapest()  # no code stored: one float32 scale per row
