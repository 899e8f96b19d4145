"""export_onnx keeps a 4-bit embedding table packed (two codes per byte) on ``com.microsoft.GatherBlockQuantized``:
the file is smaller than the int8 one, holds our codes unchanged, ORT runs that operator and equals PyTorch; codes
that do not fit its blocks stay on ``Gather`` of one byte per code, with the reason."""

import pytest
import torch
from torch import nn

from lightning_compress.quantization import quantize
from lightning_compress.quantization.carried import carried
from lightning_compress.serving import export_onnx
from lightning_compress.serving._packed_gather import block_size
from lightning_compress.serving._rewrite import Unsupported

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
numpy_helper = onnx.numpy_helper

INT4 = {"bits": 4, "granularity": "per_group", "group_size": 128, "embedding_bits": 4}


class Tagger(nn.Module):
    """Token ids in, logits out through a mean over an embedding table."""

    def __init__(self, vocab=4096, width=256):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.lin = nn.Linear(width, 4)

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids).mean(1))


def _export(tmp_path, name, seed=0, width=256, **spec):
    torch.manual_seed(seed)
    model = Tagger(width=width).eval()
    quantize(model, include=["emb"], **spec)  # the table only: ORT must then equal PyTorch to float rounding
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(model, path, {"input_ids": torch.randint(0, 4096, (2, 8))})
    return model, path, report


def _optimized_ops(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node}


def _ort_equals_torch(path, model):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((3, 5), (1, 17)):  # neither the example's shape
        ids = torch.randint(0, 4096, (batch, length), generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            want = model(ids).numpy()
        assert got.shape == want.shape
        assert abs(got - want).max() <= 1e-5 * max(1.0, abs(want).max())


def test_a_4bit_table_is_packed_and_30_percent_smaller_than_int8(tmp_path):
    _, int8_path, int8_report = _export(tmp_path, "int8", bits=8)
    model, path, report = _export(tmp_path, "int4", **INT4)
    assert int8_report.layers["emb"].op == "Gather"
    layer = report.layers["emb"]
    assert (layer.op, layer.runtime_op, layer.reason) == ("GatherBlockQuantized", "GatherBlockQuantized", "")
    assert layer.integer and report.not_integer == {}, str(report)
    assert path.stat().st_size <= 0.7 * int8_path.stat().st_size
    assert "GatherBlockQuantized" in _optimized_ops(path, tmp_path)
    _ort_equals_torch(path, model)


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_file_holds_our_codes_unchanged(tmp_path, symmetric):
    model, path, report = _export(tmp_path, "int4", symmetric=symmetric, **INT4)
    qt = carried(model).codes["emb.weight"]
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    packed = torch.tensor(inits[report.layers["emb"].codes]).to(torch.int16)  # (rows, width / 2) uint8
    assert packed.shape == (4096, 128)
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(4096, 256)
    shift = 8 if symmetric else 0  # symmetric [-8, 7] -> [0, 15], decoded by the default zero point 8
    assert torch.equal(codes, qt.q.to(torch.int16) + shift)
    zero = report.layers["emb"].codes.replace("_quantized", "_zero_point")
    assert (zero in inits) == (not symmetric)
    if not symmetric:
        zp = torch.tensor(inits[zero]).to(torch.int16)
        assert torch.equal(torch.stack([zp & 15, zp >> 4], dim=-1).reshape(4096, 2), qt.zero_point.to(torch.int16))
    _ort_equals_torch(path, model)


def test_groups_smaller_than_a_block_stay_one_byte_per_code_with_the_reason(tmp_path):
    model, path, report = _export(tmp_path, "g8", **{**INT4, "group_size": 8})
    layer = report.layers["emb"]
    assert (layer.op, layer.runtime_op) == ("Gather", "Gather") and layer.integer
    assert "group of 8 codes per scale is not a multiple of 16" in layer.reason
    assert "GatherBlockQuantized" not in _optimized_ops(path, tmp_path)
    _ort_equals_torch(path, model)


@pytest.mark.parametrize(("version", "spec", "needs"), [
    ("1.22.1", INT4, "uint8 needs onnxruntime >= 1.23, found 1.22.1"),
    ("1.23.0", {**INT4, "group_size": 16, "symmetric": False, "width": 48}, "an odd number of blocks per row needs "
     "onnxruntime >= 1.24, found 1.23.0"),
])
def test_an_onnxruntime_without_the_packed_op_keeps_the_byte_table(tmp_path, monkeypatch, version, spec, needs):
    monkeypatch.setattr(ort, "__version__", version)
    model, path, report = _export(tmp_path, "old", **spec)
    assert report.layers["emb"].op == "Gather" and needs in report.layers["emb"].reason
    _ort_equals_torch(path, model)


@pytest.mark.parametrize(("spec", "block"), [
    ({**INT4, "granularity": "per_channel"}, 256),  # one scale per row: one block of the whole row
    ({**INT4, "group_size": 16, "symmetric": False, "width": 48}, 16),  # 3 blocks: zero points padded per row
    ({**INT4, "group_size": 96, "width": 192}, 32),  # a group of 96 is 3 blocks of 32 repeating its scale
])
def test_other_groupings_stay_packed_and_equal_pytorch(tmp_path, spec, block):
    model, path, report = _export(tmp_path, "other", **spec)
    assert report.layers["emb"].op == "GatherBlockQuantized", str(report)
    node = next(n for n in onnx.load(path).graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in node.attribute}["block_size"] == block
    _ort_equals_torch(path, model)


@pytest.mark.parametrize(("width", "groups", "block"), [(256, 2, 128), (256, 1, 256), (224, 2, 16), (64, 4, 16)])
def test_block_size_is_the_largest_power_of_two_in_a_group(width, groups, block):
    assert block_size(width, groups) == block


@pytest.mark.parametrize(("width", "groups"), [(256, 32), (96, 4), (100, 1)])
def test_block_size_refuses_groups_without_a_16_block(width, groups):
    with pytest.raises(Unsupported, match=f"group of {width // groups} codes per scale is not a multiple of 16"):
        block_size(width, groups)
