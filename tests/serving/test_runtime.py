"""The export's output check: a graph that does not compute the model is an OutputCheckError, however finite."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress.serving._runtime import MAX_RELATIVE_ERROR, OutputCheckError, check_outputs, relative_error

ort = pytest.importorskip("onnxruntime")


def test_relative_error() -> None:
    want = np.array([3.0, 4.0])
    assert relative_error(want, want) == 0.0
    assert relative_error(want, want * 1.1) == pytest.approx(0.1)
    assert relative_error(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_error(np.zeros(2), np.ones(2)) == float("inf")


class Outputs(nn.Module):
    """The check's reference takes positional tensors and returns a tuple of the exported outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(x),)


def _graph(model: nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=["input"], output_names=["output"], dynamo=False)
    return buffer.getvalue()


@pytest.mark.parametrize(("change", "fails"), [(0.0, False), (0.01, False), (0.5, True)])
def test_a_graph_of_other_weights_fails_the_check(change: float, fails: bool) -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval(), torch.randn(8, 16)
    graph = _graph(model, x)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference[2].weight.mul_(1 + change)  # what the graph should have computed
    feeds = [("the example", [x], {"input": x.numpy()})]
    if fails:
        with pytest.raises(OutputCheckError, match=rf"differs from PyTorch by .* \(allowed: {MAX_RELATIVE_ERROR}"):
            check_outputs(Outputs(reference), graph, ["output"], feeds, ort)
    else:
        diff, _, samples = check_outputs(Outputs(reference), graph, ["output"], feeds, ort)
        assert samples == 8 and np.isfinite(diff)
