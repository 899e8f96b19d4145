"""What ``export_onnx`` reports: per quantized layer, the operator written and the one ONNX Runtime really runs
(or why not an integer one); for the file, its size, inputs, outputs and how close ORT came to PyTorch. No
Lightning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lightning_compress.serving._runtime import INTEGER_OPS


@dataclass
class LayerExport:
    """How one quantized layer was exported and what ONNX Runtime runs for it."""

    module: str
    module_type: str
    bits: int
    granularity: str
    op: str  # what the written graph holds: MatMulInteger, ConvInteger, QLinearConv, QGemm, MatMulNBits, ...
    runtime_op: str | None = None  # the operator reading our codes after ORT's graph optimizations
    reason: str = ""  # why it is not on an integer operator
    codes: str = ""  # name of the initializer holding the codes
    used: bool = True  # False: the exported outputs do not depend on this layer, so the graph has no trace of it
    input_range: tuple[float, int] | None = None  # static: the uint8 (scale, zero point) its input is read with

    @property
    def integer(self) -> bool:
        """On an integer operator, or an embedding looked up from its integer table (``Gather`` of our codes)."""
        return self.runtime_op in INTEGER_OPS or (self.runtime_op == "Gather" and self.op == "Gather")


@dataclass
class OnnxExportReport:
    path: Path
    nbytes: int
    activations: str
    opset: int
    layers: dict[str, LayerExport] = field(default_factory=dict)
    max_abs_diff: float = float("nan")  # ORT vs the in-memory model, over the checked samples and outputs
    argmax_agreement: float = float("nan")  # fraction of samples whose argmax agrees (nan unless (batch, classes))
    samples: int = 0
    onnxruntime: str = ""
    inputs: list[str] = field(default_factory=list)  # graph input names, in order
    outputs: list[str] = field(default_factory=list)  # graph output names, in order
    source: str = ""  # where the codes came from: "result", the carried record's source, "" for a float model

    @property
    def not_integer(self) -> dict[str, str]:
        """Quantized layers ORT does not run on an integer operator -> why."""
        return {name: layer.reason or f"ORT runs {layer.runtime_op}" for name, layer in self.layers.items()
                if not layer.integer and layer.used}

    @property
    def unused(self) -> list[str]:
        """Quantized layers the exported outputs do not depend on (e.g. BERT's pooler under ``last_hidden_state``)."""
        return [name for name, layer in self.layers.items() if not layer.used]

    def __str__(self) -> str:
        ops = ", ".join(f"{n}: {layer.runtime_op or layer.op}" for n, layer in self.layers.items())
        agreement = ("n/a" if self.argmax_agreement != self.argmax_agreement
                     else f"{100 * self.argmax_agreement:.2f} %")
        lines = [
            (f"{self.path} ({self.nbytes / 1e6:.2f} MB, {self.activations} activations, opset {self.opset}, "
             f"onnxruntime {self.onnxruntime}); inputs {self.inputs} -> outputs {self.outputs}"),
            (f"quantized layers ({self.source}) -> ORT ops: {ops}" if self.layers
             else "float model: nothing quantized (no `result`, no codes carried by the model)"),
            (f"ORT vs in-memory model on {self.samples} samples: max |diff| {self.max_abs_diff:.3g}, "
             f"argmax agreement {agreement}"),
        ]
        if self.not_integer:
            lines.append(f"NOT on integer kernels: {self.not_integer}")
        if self.unused:
            lines.append(f"not in the graph (the exported outputs do not use them): {self.unused}")
        return "\n".join(lines)
