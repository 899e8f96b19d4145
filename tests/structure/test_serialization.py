"""save_compacted / load_compacted: tied weights stored once, and every declaration of a file checked against the
file and the model before anything is allocated."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_compress.core.io import UntrustedFileError
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.structure.compaction import compact, count_parameters, load_compacted, save_compacted
from lightning_compress.structure.serialization import FORMAT
from lightning_compress.structure.shape_rules import RECORD_KEY, compacted_axes


def mlp() -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(input_size=8, hidden=[32])


def write_header(path, header: dict, data: bytes = b"") -> None:  # type: ignore[no-untyped-def]
    raw = json.dumps({"__metadata__": {"format": FORMAT, "aliases": "{}"}, **header}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.hidden, self.head = nn.Embedding(10, 6), nn.Linear(6, 8), nn.Linear(8, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(torch.relu(self.hidden(self.embedding(ids)))))


def test_tied_weights_are_stored_once_counted_once_and_stay_tied(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, ids = TiedLM(), torch.randint(0, 10, (2, 3))
    result = compact(model, {"hidden": torch.arange(8) < 5}, ids)
    assert result.params_before == 60 + 6 * 8 + 8 + 8 * 6 + 6  # the tied matrix once
    save_compacted(result.model, tmp_path / "lm.safetensors")
    fresh = load_compacted(TiedLM(), tmp_path / "lm.safetensors")
    assert fresh.out.weight is fresh.embedding.weight and count_parameters(fresh) == result.params_after
    torch.testing.assert_close(fresh(ids), result.model(ids), atol=0, rtol=0)


def test_a_grown_layer_is_refused_before_allocating(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "grown.safetensors"
    big = MLPClassifier(input_size=8, hidden=[4096])
    save_compacted(big, path)
    with pytest.raises(UntrustedFileError, match=r"grown.safetensors', key 'net.1.bias': declared shape \[4096\], "
                       r"the model has \[32\]; allowed: exactly the model's shape"):
        load_compacted(mlp(), path)


def test_a_small_file_declaring_a_huge_tensor_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "huge.safetensors"
    write_header(path, {"net.1.weight": {"dtype": "F32", "shape": [2**14, 2**14], "data_offsets": [0, 2**30]}},
                 data=b"\0" * 4000)
    with pytest.raises(ValueError, match=r"huge.safetensors', key 'net.1.weight': `data_offsets` \[0, 1073741824\] "
                       r"do not lie within the file's 4000 bytes of tensor data"):
        load_compacted(mlp(), path)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"extra": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "key 'extra': is not in the model"),
        ({"net.1.weight": {"dtype": "F32", "shape": [32, 8, 1], "data_offsets": [0, 1024]}},
         r"declared shape \[32, 8, 1\], the model has \[32, 8\]"),
        ({"net.1.weight": {"dtype": "X9", "shape": [32, 8], "data_offsets": [0, 1024]}}, "dtype 'X9'"),
        ({"net.1.weight": {"dtype": "F16", "shape": [32, 8], "data_offsets": [0, 512]}},
         "bad.safetensors' declares tensor 'net.1.weight' as F16, but the model's is F32"),
        ({"net.1.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]}},
         r"key 'net.1.weight': declared shape \[2, 8\], the model has \[32, 8\]"),
    ],
)
def test_malformed_declarations_name_the_file_and_the_key(tmp_path, header: dict, match: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.safetensors"
    write_header(path, header, data=b"\0" * 1024)
    with pytest.raises(ValueError, match=match):
        load_compacted(mlp(), path)


def test_truncated_and_foreign_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    short = tmp_path / "short.safetensors"
    short.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match=r"short\.safetensors' declares a 1000000000-byte header but holds 10 bytes"):
        load_compacted(mlp(), short)
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(ValueError, match="was not written by save_compacted"):
        load_compacted(nn.Linear(2, 2), plain)


# ---------------------------------------------------------------------------- the compaction record (issue 19)
def _compacted(keep: int = 20) -> MLPClassifier:
    model = mlp()
    return compact(model, {"net.1": torch.arange(32) < keep}, torch.zeros(2, 8)).model


def _resave_metadata(path, change) -> None:  # type: ignore[no-untyped-def]
    with safe_open(str(path), framework="pt") as handle:
        values, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())
    change(metadata)
    save_file(values, str(path), metadata=metadata)


def test_the_file_records_which_axes_compaction_shrank_and_the_loaded_model_carries_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _compacted()
    expected = {"net.1.weight": {0: 32}, "net.1.bias": {0: 32}, "net.3.weight": {1: 32}}
    assert compacted_axes(model) == expected  # rows of net.1, columns of its consumer; the input axis untouched
    save_compacted(model, tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()[RECORD_KEY]) == {
            "net.1.bias": {"0": 32}, "net.1.weight": {"0": 32}, "net.3.weight": {"1": 32}}
    fresh = load_compacted(mlp(), tmp_path / "c.safetensors")
    assert compacted_axes(fresh) == expected and fresh.net[1].out_features == 20
    torch.testing.assert_close(fresh(torch.ones(3, 8)), model(torch.ones(3, 8)), atol=0, rtol=0)


def test_a_file_without_the_record_may_shrink_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name, model in (("compacted", _compacted()), ("full", mlp())):
        path = tmp_path / f"{name}.safetensors"
        save_compacted(model, path)
        _resave_metadata(path, lambda metadata: metadata.pop(RECORD_KEY))  # as an older version wrote it
    with pytest.raises(UntrustedFileError, match=r"compacted.safetensors', key 'net.1.bias': declared shape \[20\], "
                       r"the model has \[32\]; allowed: exactly the model's shape \(the file has no 'compacted_axes'"):
        load_compacted(mlp(), tmp_path / "compacted.safetensors")
    assert load_compacted(mlp(), tmp_path / "full.safetensors").net[1].out_features == 32  # nothing to shrink: fine


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ("[0]", r"'compacted_axes' must be a JSON object"),
        ('{"net.1.weight": [0]}', r"entry 'net.1.weight' must map axes '0' / '1' to positive integer sizes"),
        ('{"net.1.weight": {"2": 32}}', r"entry 'net.1.weight' must map axes"),
        ('{"net.1.weight": {"0": 64}}', r"key 'net.1.weight': compacted from sizes \{0: 64\}.*the model has \[32, 8\]"),
        ('{"net.9.weight": {"0": 4}}', r"lists 'net.9.weight' axes \[0\]; allowed: keys of the model's state_dict"),
        ("{bad", r"metadata 'compacted_axes' is not valid JSON"),
    ],
)
def test_a_malformed_or_foreign_record_is_refused(tmp_path, record: str, match: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.safetensors"
    save_compacted(_compacted(), path)
    _resave_metadata(path, lambda metadata: metadata.update({RECORD_KEY: record}))
    model = mlp()
    with pytest.raises(UntrustedFileError, match=match):
        load_compacted(model, path)
    assert model.net[1].out_features == 32 and model.net[1].weight.shape == (32, 8)


def test_a_cnn_compacted_from_another_width_is_refused_and_its_own_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lightning_compress.demos.models import SmallCNN

    def compacted_cnn(channels: list[int]) -> SmallCNN:
        torch.manual_seed(0)
        model = SmallCNN(image_size=8, channels=channels, hidden=8).eval()
        return compact(model, {"net.0": torch.arange(channels[0]) < 3}, torch.rand(2, 1, 8, 8)).model

    ours, wider = compacted_cnn([4, 6]), compacted_cnn([8, 6])  # both keep 3 channels of the first conv
    save_compacted(ours, tmp_path / "ours.safetensors")
    save_compacted(wider, tmp_path / "wider.safetensors")
    fresh = load_compacted(SmallCNN(image_size=8, channels=[4, 6], hidden=8).eval(), tmp_path / "ours.safetensors")
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(fresh(x), ours(x), atol=0, rtol=0)
    model = SmallCNN(image_size=8, channels=[4, 6], hidden=8)
    with pytest.raises(UntrustedFileError, match=r"wider.safetensors', key 'net.0.bias': compacted from sizes "
                       r"\{0: 8\} \(axis: size\), the model has \[4\]"):
        load_compacted(model, tmp_path / "wider.safetensors")
    assert model.net[0].out_channels == 4


def test_a_submodule_of_a_compacted_model_carries_its_part_of_the_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    outer = nn.Sequential(mlp())
    compact(outer, {"0.net.1": torch.arange(32) < 20}, torch.zeros(2, 8), inplace=True)
    assert compacted_axes(outer)["0.net.1.weight"] == {0: 32}
    assert compacted_axes(outer[0]) == {"net.1.weight": {0: 32}, "net.1.bias": {0: 32}, "net.3.weight": {1: 32}}
    save_compacted(outer[0], tmp_path / "inner.safetensors")  # saved alone: its own keys, its own record
    assert load_compacted(mlp(), tmp_path / "inner.safetensors").net[1].out_features == 20


def test_a_model_built_at_the_compacted_width_loads_the_compacted_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _compacted()  # hidden 32 -> 20
    save_compacted(model, tmp_path / "c.safetensors")
    narrow = MLPClassifier(input_size=8, hidden=[20])  # that architecture, built directly: every shape equal
    load_compacted(narrow, tmp_path / "c.safetensors")
    torch.testing.assert_close(narrow(torch.ones(3, 8)), model(torch.ones(3, 8)), atol=0, rtol=0)
    with pytest.raises(UntrustedFileError, match=r"'net.1.bias': compacted from sizes \{0: 32\}.*the model has \[16\]"):
        load_compacted(MLPClassifier(input_size=8, hidden=[16]), tmp_path / "c.safetensors")  # narrower still: no
