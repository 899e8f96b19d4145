"""How export_onnx reads examples and outputs: names from dict keys or the forward signature, integer dtypes kept,
dynamic axes per input, the probe at other sizes, outputs chosen by name or index (tuple, dict, ModelOutput)."""

import pytest
import torch
from torch import nn

from lightning_compress.serving import _inputs, export_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class Tokens(nn.Module):
    """Token ids (int64) and a float weight per token in, a tuple out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, token_weights):
        h = self.embed(input_ids) * token_weights.unsqueeze(-1)
        return h, self.head(h.mean(1))


IDS = torch.randint(0, 50, (2, 9))
WEIGHTS = torch.rand(2, 9)


def test_names_come_from_the_signature_for_a_tuple_and_from_keys_for_a_dict():
    model = Tokens()
    positional = _inputs.prepare(model, (IDS, WEIGHTS), "example_inputs")
    assert positional.names == ["input_ids", "token_weights"] and not positional.keywords
    keyword = _inputs.prepare(model, {"token_weights": WEIGHTS, "input_ids": IDS}, "example_inputs")
    assert keyword.names == ["token_weights", "input_ids"] and keyword.keywords
    single = _inputs.prepare(nn.Linear(9, 2), WEIGHTS, "example_input")
    assert single.names == ["input"] and single.single  # the name ONNX files had before: callers keep working
    feed = positional.feed(positional.tensors)
    assert str(feed["input_ids"].dtype) == "int64" and str(feed["token_weights"].dtype) == "float32"


def test_default_dynamic_axes_per_dtype_and_the_override():
    inputs = _inputs.prepare(Tokens(), (IDS, WEIGHTS), "example_inputs")
    both = {0: "batch", 1: "sequence"}
    assert _inputs.axes(inputs, None) == {"input_ids": both, "token_weights": both}  # one weight per token
    pooled = _inputs.prepare(Tokens(), (IDS, torch.rand(2, 4)), "example_inputs")  # not one value per token
    assert _inputs.axes(pooled, None)["token_weights"] == {0: "batch"}
    custom = _inputs.axes(inputs, {"token_weights": [0, 1], "input_ids": {0: "rows"}})
    assert custom == {"input_ids": {0: "rows"}, "token_weights": both}
    assert _inputs.axes(inputs, {"input_ids": []})["input_ids"] == {}


def test_the_probe_changes_every_dynamic_axis_and_shared_axes_together():
    inputs = _inputs.prepare(Tokens(), (IDS, WEIGHTS), "example_inputs")
    axes = _inputs.axes(inputs, {"token_weights": {0: "batch", 1: "sequence"}})
    ids, weights = _inputs.probe(inputs, axes)
    assert ids.shape == weights.shape == (3, 8) and ids.dtype == torch.int64
    assert torch.equal(ids[:2], IDS[:, :8]) and torch.equal(ids[2], IDS[1, :8])  # the last row repeated
    assert _inputs.probe(inputs, {"input_ids": {}, "token_weights": {}}) is None


def test_outputs_by_name_or_index_from_a_tuple_a_dict_and_a_model_output():
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.BaseModelOutputWithPooling(
        last_hidden_state=torch.zeros(2, 3, 4), pooler_output=torch.ones(2, 4))
    assert _inputs.select(out, None) == (["last_hidden_state"], [0])
    assert _inputs.select(out, ["pooler_output", 0]) == (["pooler_output", "last_hidden_state"], [1, 0])
    assert _inputs.select((torch.zeros(1), None, torch.ones(1)), [2]) == (["output_2"], [2])
    assert _inputs.select({"loss": None, "logits": torch.ones(1)}, None) == (["logits"], [1])
    with pytest.raises(ValueError, match=r"`outputs`=\['logits', 1\] names one output twice"):
        _inputs.select({"loss": None, "logits": torch.ones(1)}, ["logits", 1])


def test_a_tuple_output_model_exports_the_output_asked_for_with_integer_ids(tmp_path):
    report = export_onnx(Tokens(), tmp_path / "t.onnx", (IDS, WEIGHTS), outputs=1,
                         calibration_data=[(IDS[:1], WEIGHTS[:1], "label")])
    assert report.inputs == ["input_ids", "token_weights"] and report.outputs == ["output_1"]
    assert report.samples == 3 and report.max_abs_diff < 1e-5 and report.argmax_agreement == 1.0
    graph = onnx.load(tmp_path / "t.onnx").graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.INT64, onnx.TensorProto.FLOAT]
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", ""]


def test_the_older_keyword_example_input_still_works(tmp_path):
    model = nn.Sequential(nn.Linear(9, 4)).eval()
    report = export_onnx(model, tmp_path / "m.onnx", example_input=WEIGHTS)
    assert report.inputs == ["input"] and report.outputs == ["output"] and report.max_abs_diff < 1e-5


def test_output_axes_follow_the_dynamic_input_sizes():
    inputs = _inputs.prepare(Tokens(), (IDS, WEIGHTS), "example_inputs")
    axes = _inputs.axes(inputs, None)
    assert _inputs.output_axes(inputs, axes, torch.zeros(2, 9, 16)) == {0: "batch", 1: "sequence"}
    assert _inputs.output_axes(inputs, axes, torch.zeros(2, 9)) == {0: "batch", 1: "sequence"}  # per-token logits
    assert _inputs.output_axes(inputs, axes, torch.zeros(2, 3)) == {0: "batch"}
