"""export_onnx refuses bad input before anything is written, and its check cannot report success on garbage."""

import os

import pytest
import torch
from torch import nn

from lightning_compress.serving import OutputCheckError, export_onnx

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        y = self.body(x)
        return {"logits": y, "probs": y.softmax(-1), "note": "not a tensor"}


def _nan(shape=(4, 8), where=(1, 3)):
    x = torch.randn(*shape)
    x[where] = float("nan")
    return x


X = torch.randn(4, 8)

# (case id, model, path name, kwargs, error type, message pattern)
REFUSALS = [
    ("nan example", _mlp(), "m.onnx", {"example_inputs": _nan()}, ValueError,
     r"`example_inputs` input 'input' holds 1 NaN and 0 inf values \(shape \(4, 8\)\)"),
    ("inf example, old name", _mlp(), "m.onnx", {"example_input": X.clone().fill_(float("inf"))}, ValueError,
     r"`example_input` input 'input' holds 0 NaN and 32 inf values"),
    ("nan in a dict example", TwoHeads(), "m.onnx", {"example_inputs": {"x": _nan()}}, ValueError,
     r"`example_inputs` input 'x' holds 1 NaN"),
    ("nan calibration batch", _mlp(), "m.onnx",
     {"example_inputs": X, "calibration_data": [(X, 0), (_nan(), 1)]}, ValueError,
     r"`calibration_data` batch 1 input 'input' holds 1 NaN"),
    ("nan static calibration tensor", _mlp(), "m.onnx",
     {"example_inputs": X, "activations": "static", "calibration_data": _nan((200, 8), (150, 2))}, ValueError,
     r"`calibration_data` batch 2 input 'input' holds 1 NaN"),
    ("empty calibration", _mlp(), "m.onnx", {"example_inputs": X, "calibration_data": []}, ValueError,
     r"`calibration_data` is empty"),
    ("safetensors path", _mlp(), "m.safetensors", {"example_inputs": X}, ValueError,
     r"`path`='.*m.safetensors' must end in '.onnx' \(a safetensors export is save_quantized's job\)"),
    ("no suffix", _mlp(), "model", {"example_inputs": X}, ValueError, r"`path`='.*model' must end in '.onnx'"),
    ("model None", None, "m.onnx", {"example_inputs": X}, TypeError,
     r"`model` must be a torch.nn.Module, got NoneType"),
    ("state_dict as model", _mlp().state_dict(), "m.onnx", {"example_inputs": X}, TypeError,
     r"`model` must be a torch.nn.Module, got a OrderedDict \(a state_dict\?\): build the model"),
    ("wrong feature size", _mlp(), "m.onnx", {"example_inputs": torch.randn(4, 7)}, ValueError,
     r"`example_inputs` \(input: \(4, 7\) float32\) cannot go through the model: .*its first layer '0' \(Linear\) "
     r"expects inputs whose last dim is 8"),
    ("ids beyond the vocabulary", nn.Sequential(nn.Embedding(10, 4), nn.Flatten()), "m.onnx",
     {"example_inputs": torch.tensor([[3, 12]])}, ValueError,
     r"`example_inputs` \(input: \(1, 2\) int64\) cannot go through the model: .*its first layer '0' \(Embedding\) "
     r"expects integer ids in \[0, 9\]"),
    ("float ids", nn.Sequential(nn.Embedding(10, 4)), "m.onnx", {"example_inputs": torch.rand(1, 2)}, ValueError,
     r"`example_inputs` \(input: \(1, 2\) float32\) cannot go through .*expects integer ids in \[0, 9\]"),
    ("no example", _mlp(), "m.onnx", {}, TypeError, r"`example_inputs` is required"),
    ("both names", _mlp(), "m.onnx", {"example_inputs": X, "example_input": X}, TypeError,
     r"pass `example_inputs` or its older name `example_input`, not both"),
    ("numpy example", _mlp(), "m.onnx", {"example_inputs": X.numpy()}, TypeError,
     r"`example_inputs` must be a torch.Tensor, a tuple of tensors .* got ndarray"),
    ("non-tensor in a dict", TwoHeads(), "m.onnx", {"example_inputs": {"x": [1.0]}}, TypeError,
     r"`example_inputs`\['x'\] must be a torch.Tensor, got list"),
    ("unknown output name", TwoHeads(), "m.onnx", {"example_inputs": {"x": X}, "outputs": "loss"}, ValueError,
     r"`outputs` asks for 'loss'; the model returns 3 outputs: .*'logits'"),
    ("non-tensor output", TwoHeads(), "m.onnx", {"example_inputs": {"x": X}, "outputs": ["note"]}, ValueError,
     r"`outputs` asks for 'note'"),
    ("output index out of range", TwoHeads(), "m.onnx", {"example_inputs": {"x": X}, "outputs": 5}, ValueError,
     r"`outputs` asks for 5"),
    ("dynamic axes of an unknown input", _mlp(), "m.onnx", {"example_inputs": X, "dynamic_axes": {"ids": [0]}},
     ValueError, r"`dynamic_axes` names the input 'ids'; the inputs are \['input'\]"),
    ("dynamic axis out of range", _mlp(), "m.onnx", {"example_inputs": X, "dynamic_axes": {"input": [2]}},
     ValueError, r"`dynamic_axes`\['input'\]=\[2\]: dims must be integers in \[0, 1\]"),
    ("calibration batch of another form", TwoHeads(), "m.onnx",
     {"example_inputs": {"x": X}, "calibration_data": [X]}, TypeError,
     r"`calibration_data` batch 0 must be a dict with the keys \['x'\], got Tensor"),
]


@pytest.mark.parametrize(("model", "name", "kwargs", "error", "match"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refused_before_anything_is_written(tmp_path, model, name, kwargs, error, match):
    before = None if model is None or isinstance(model, dict) else {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        export_onnx(model, tmp_path / name, **kwargs)
    assert os.listdir(tmp_path) == []  # no file, no temporary file
    if before is not None:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_weights_fail_the_check_and_leave_no_file(tmp_path):
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(OutputCheckError, match=r"output 'output' on the example has 4 non-finite values in PyTorch "
                                               r"and 4 in ONNX Runtime; .* nothing was written"):
        export_onnx(model, target, X)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.onnx"]


def test_overflow_to_inf_in_the_outputs_is_a_failure(tmp_path):
    model = _mlp()
    with torch.no_grad():
        model[2].weight.fill_(3e38)  # finite weights, infinite outputs
    with pytest.raises(OutputCheckError, match=r"non-finite values"):
        export_onnx(model, tmp_path / "m.onnx", X.abs() + 1)
    assert os.listdir(tmp_path) == []


def test_a_dict_output_model_is_exported_and_checked_on_the_named_output(tmp_path):
    report = export_onnx(TwoHeads(), tmp_path / "m.onnx", {"x": X}, outputs=["probs", "logits"],
                         calibration_data=[{"x": torch.randn(16, 8), "label": 0}])
    assert report.outputs == ["probs", "logits"] and report.inputs == ["x"]
    assert report.samples == 20 and report.max_abs_diff < 1e-5 and report.argmax_agreement == 1.0
    assert "float model: nothing quantized" in str(report)


class Baked(nn.Module):
    """Turns the batch size into a constant while traced."""

    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x).reshape(int(x.shape[0]), 2, 2)


def test_a_dynamic_axis_the_trace_made_constant_is_caught_and_nothing_written(tmp_path):
    with pytest.raises(OutputCheckError, match=r"ONNX Runtime cannot run the exported graph on the example at other "
                                               r"sizes along its dynamic axes \{'input': \(5, 8\)\}: .*`dynamic_axes`"):
        export_onnx(Baked(), tmp_path / "m.onnx", X)
    assert os.listdir(tmp_path) == []
    report = export_onnx(Baked(), tmp_path / "m.onnx", X, dynamic_axes={"input": []})  # static, as asked
    assert report.max_abs_diff < 1e-5


class PairedLengths(nn.Module):
    """Two values per token in a float input whose length is not the tokens': no default can guess that."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 2)

    def forward(self, input_ids, pairs):
        return (self.embed(input_ids) * pairs.view(pairs.shape[0], input_ids.shape[1], 2)).sum(1)


def test_a_model_that_cannot_run_at_the_probe_sizes_is_told_to_declare_its_axes(tmp_path):
    ids, pairs = torch.randint(0, 10, (2, 5)), torch.rand(2, 10)
    with pytest.raises(OutputCheckError, match=r"the model itself cannot run the example at other sizes along its "
                                               r"dynamic axes \(\[\(3, 4\), \(3, 10\)\]\): .*`dynamic_axes`"):
        export_onnx(PairedLengths(), tmp_path / "p.onnx", (ids, pairs))
    assert os.listdir(tmp_path) == []
    report = export_onnx(PairedLengths(), tmp_path / "p.onnx", (ids, pairs), dynamic_axes={"input_ids": [0]})
    assert report.max_abs_diff < 1e-5
