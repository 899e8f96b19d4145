"""One layer's quantization: :class:`LayerQuantization` (codes, qparams, SQNR, sparsity, bytes as exported) and the
two ways one is made in place: :func:`quantize_layer` (round to nearest from the module's current weight) and
:func:`record_layer` (write given codes, e.g. GPTQ's, into the module). No Lightning import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.quantization import sparse_layout
from lightning_compress.quantization.coverage import check_finite, weight_name
from lightning_compress.quantization.coverage import layer_weight as _weight
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec, quantize_tensor, sqnr_db


@dataclass
class LayerQuantization:
    """One quantized weight: where it lives, its codes/qparams and how faithful it is."""

    module: str  # qualified module name, e.g. "net.1"
    attr: str  # "weight" or "in_proj_weight"
    module_type: str
    qtensor: QuantizedTensor
    sqnr_db: float
    sparsity: float  # fraction of exact zeros after quantization (equals the fraction before: zeros stay zero)
    method: str = "rtn"  # "rtn" or "gptq" (whose SQNR is lower by design: it minimizes the *output* error)

    @property
    def key(self) -> str:
        """The weight's ``state_dict`` key."""
        return f"{self.module}.{self.attr}" if self.module else self.attr

    @property
    def bits(self) -> int:
        return self.qtensor.spec.bits

    def nbytes(self) -> int:
        """Bytes of codes (packed, in the layout the export chooses: dense or sparse) plus scales and zero points,
        as exported (:func:`~lightning_compress.quantization.sparse_layout.nbytes`)."""
        return sparse_layout.nbytes(self.qtensor)

    def summary(self) -> dict[str, Any]:
        spec = self.qtensor.spec
        return {
            "module": self.module,
            "type": self.module_type,
            "bits": spec.bits,
            "granularity": spec.granularity,
            "group_size": spec.group_size if spec.granularity == "per_group" else None,
            "symmetric": spec.symmetric,
            "calibration": spec.calibration,
            "scale_dtype": str(self.qtensor.scale.dtype).removeprefix("torch."),
            "shape": list(self.qtensor.shape),
            "sqnr_db": self.sqnr_db,
            "sparsity": self.sparsity,
            "nbytes": self.nbytes(),
            "method": self.method,
        }




def quantize_layer(name: str, module: nn.Module, spec: QuantSpec) -> LayerQuantization:
    """Quantize one module's weight and write the dequantized values into it, in place."""
    weight = _weight(name, module)
    check_finite({name: module})
    return record_layer(name, module, quantize_tensor(weight, spec), "rtn")


def record_layer(
    name: str, module: nn.Module, qtensor: QuantizedTensor, method: str, reference: Tensor | None = None
) -> LayerQuantization:
    """Write ``qtensor``'s dequantized values into the module's weight; SQNR against ``reference`` (default: the
    weight it replaces)."""
    weight = _weight(name, module)
    dequantized = qtensor.dequantize()
    with torch.no_grad():
        sqnr = sqnr_db(weight if reference is None else reference, dequantized)
        weight.copy_(dequantized)
        sparsity = float((weight == 0).sum().item()) / max(1, weight.numel())
    return LayerQuantization(name, weight_name(module), type(module).__name__, qtensor, sqnr, sparsity, method)
