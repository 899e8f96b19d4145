"""Integer inference for ``nn.Linear``: int8 weights x dynamically quantized int8 activations -> int32.

:class:`Int8Linear` computes ``y = (x_q @ W_q^T) * (s_x * s_w) + b`` where

- ``W_q`` (``int8``, ``(out, in)``) and ``s_w`` (float32, one per output row) come from the exported codes
  (symmetric codes, or asymmetric codes minus their zero point, when they fit int8);
- ``x_q = round(x / s_x)`` with ``s_x = max|x_row| / 127`` chosen per row of the input at run time;
- ``x_q @ W_q^T`` runs in ``torch._int_mm`` (int8 x int8 -> int32, oneDNN/VNNI on x86 CPUs, cuBLASLt on CUDA).

The activation rounding is the only error added to the dequantized float layer: per output,
``|y_int - y_float| <= s_x / 2 * sum_k |W_hat[i, k]|`` (plus float32 rounding). Measured on this 2-core AVX-512
box at batch 64 (see ``benchmarks/bench_quantization.py``) this path is several times faster than fp32 and than
torchao's ``Int8DynamicActivationInt8WeightConfig`` on CPU, which is why it is the default int path; torchao stays
optional and is only imported inside :func:`torchao_quantize_`.

Conv layers keep float (dequantized) weights at inference. On CUDA, :func:`torchao_quantize_` applies torchao's
int8 / int4 weight-only configs where torchao supports them (not tested here: no GPU on the build machine).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core.validation import check_choice, check_number
from lightning_compress.core._compat import int8_matmul
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec, quantize_tensor

_ACT_QMAX = 127.0  # symmetric activation codes in [-127, 127]


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (one float scale per output row) and int8 dynamic activations."""

    def __init__(self, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"`qweight` must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        if weight_scale.numel() != qweight.shape[0]:
            raise ValueError(
                f"`weight_scale` must hold {qweight.shape[0]} scales (one per row), got {weight_scale.numel()}"
            )
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())  # (out, in) int8
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(-1).contiguous())  # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_quantized(cls, linear: nn.Linear, qtensor: QuantizedTensor) -> Int8Linear:
        int_weight = qtensor.int_weight()
        if int_weight is None:
            raise ValueError(
                f"a {qtensor.spec.bits}-bit {qtensor.spec.granularity} weight (symmetric={qtensor.spec.symmetric}) "
                "has no int8 form with one scale per row; allowed: per_tensor / per_channel, symmetric or <= 7 bits"
            )
        return cls(int_weight, qtensor.row_scale(), linear.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8) -> Int8Linear:
        """Quantize a float Linear (symmetric per-channel, min/max) straight into an Int8Linear."""
        return cls.from_quantized(linear, quantize_tensor(linear.weight, QuantSpec(bits=bits)))

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.weight_scale.unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()  # (M, in)
        if not _int_mm_ok(x2, self.qweight):
            y = F.linear(x2, self.dequantized_weight(), self.bias)
            return y.reshape(*lead, self.out_features).to(x.dtype)
        x_scale = x2.abs().amax(dim=1, keepdim=True).div_(_ACT_QMAX).clamp_(min=torch.finfo(torch.float32).tiny)
        x_q = torch.round(x2 / x_scale).clamp_(-_ACT_QMAX, _ACT_QMAX).to(torch.int8)  # (M, in)
        acc = int8_matmul(x_q, self.qweight.t())  # (M, out) int32, exact
        y = acc.float().mul_(x_scale * self.weight_scale)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _int_mm_ok(x: Tensor, qweight: Tensor) -> bool:
    if x.shape[0] == 0:
        return False
    if x.is_cuda:  # cuBLASLt int8 GEMM constraints
        return x.shape[0] > 16 and x.shape[1] % 8 == 0 and qweight.shape[0] % 8 == 0
    return x.device.type == "cpu"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_int8_linear(model: nn.Module, quantized: Mapping[str, QuantizedTensor]) -> list[str]:
    """Replace each ``nn.Linear`` submodule whose ``<name>.weight`` is in ``quantized`` (and has an int8 form) by
    an :class:`Int8Linear` on the Linear's device (a bare Linear model is left as it is). Returns the names swapped."""
    swapped = []
    for name, module in list(model.named_modules()):
        qt = quantized.get(f"{name}.weight" if name else "weight")
        if not name or type(module) is not nn.Linear or qt is None or qt.int_weight() is None:
            continue
        new = Int8Linear.from_quantized(module, qt).to(module.weight.device)
        _set_submodule(model, name, new)
        swapped.append(name)
    return swapped


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """torchao logs 'Failed to load ..._C_*.so' and pytree deprecations on CPU-only installs; hush them."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


TORCHAO_CONFIGS = ("int8_dynamic", "int8_weight_only", "int4_weight_only")


def torchao_quantize_(
    model: nn.Module,
    config: str = "int8_dynamic",
    group_size: int = 128,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Apply a torchao config to ``model``'s Linear layers in place (optional dependency ``torchao``).

    ``"int8_dynamic"`` (CPU and CUDA) is what the benchmark compares :class:`Int8Linear` with;
    ``"int8_weight_only"`` and ``"int4_weight_only"`` (``group_size``) are the CUDA weight-only paths. torchao
    computes its own qparams from the weights it is given (here usually the dequantized ones), so its codes are
    not guaranteed to equal the exported ones.
    """
    check_choice("config", config, TORCHAO_CONFIGS)
    check_number("group_size", group_size, low=1, integer=True)
    with _quiet_torchao():
        try:
            from torchao.quantization import (
                Int4WeightOnlyConfig,
                Int8DynamicActivationInt8WeightConfig,
                Int8WeightOnlyConfig,
                quantize_,
            )
        except ImportError:
            raise ImportError(
                "`torchao_quantize_` needs torchao: `pip install 'lightning-compress[torchao]'`"
            ) from None
        if config == "int4_weight_only" and not any(p.is_cuda for p in model.parameters()):
            raise RuntimeError("`config`='int4_weight_only' needs the model on a CUDA device (torchao int4 kernels)")
        configs = {
            "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
            "int8_weight_only": Int8WeightOnlyConfig,
            "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=group_size),
        }
        quantize_(model, configs[config](), filter_fn=filter_fn)
    return model
