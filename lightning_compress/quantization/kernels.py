"""Integer inference for ``nn.Linear``: int8 weights x dynamically quantized int8 activations -> int32.

:class:`Int8Linear` computes ``y = (x_q @ W_q^T) * (s_x * s_w) + b`` where

- ``W_q`` (``int8``, ``(out, in)``) and ``s_w`` (float32, one per output row) come from the exported codes
  (symmetric codes, or asymmetric codes minus their zero point, when they fit int8);
- ``x_q = round(x / s_x)`` with ``s_x = max|x_row| / 127`` chosen per row of the input at run time;
- ``x_q @ W_q^T`` runs in ``torch._int_mm`` (int8 x int8 -> int32, oneDNN/VNNI on x86 CPUs, cuBLASLt on CUDA).

The activation rounding is the only error added to the dequantized float layer: per output,
``|y_int - y_float| <= s_x / 2 * sum_k |W_hat[i, k]|`` (plus float32 rounding).

Whether ``torch._int_mm`` is faster than float depends on the CPU: several times faster with AVX-512 VNNI, but 24x
*slower* measured on an AVX2 CPU (784->1792, batch 64: 100.9 ms vs 4.2 ms). So :func:`swap_int8_linear` never
swaps blindly: per layer shape it runs a short self-test on this machine (:func:`int8_kernel_decision`: the int8
result must stay within the activation-rounding bound of ``F.linear`` on the dequantized weight, and be at least
``SPEED_MARGIN`` x faster at a representative batch), cached per shape and process, and keeps float with a warning
that says why (with ``torch.backends.cpu.get_cpu_capability()``) otherwise. The environment variable
``LIGHTNING_COMPRESS_INT8_KERNELS`` = ``auto`` (default) / ``always`` (skip the speed test) / ``never`` overrides it.
Layers inside ``nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer`` / ``MultiheadAttention`` are skipped (their
fused fast path reads ``.weight`` directly and would bypass the int8 kernel); :class:`Int8Linear` still exposes a
dequantized ``weight`` for code that reads it. torchao stays optional and is only imported inside
:func:`torchao_quantize_`. For integer inference of Conv layers and 4-bit / per-group weights, export to ONNX
Runtime (:func:`lightning_compress.serving.export_onnx`).

Conv layers keep float (dequantized) weights at inference. On CUDA, :func:`torchao_quantize_` applies torchao's
int8 / int4 weight-only configs where torchao supports them (not tested here: no GPU on the build machine).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core._compat import has_int8_matmul, int8_matmul
from lightning_compress.core.validation import check_choice, check_number
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec, quantize_tensor

_ACT_QMAX = 127.0  # symmetric activation codes in [-127, 127]
SPEED_MARGIN = 1.1  # the int8 path must be at least this many times faster than float to be used
SELF_TEST_BATCH = 64  # rows of the representative input the self-test times
POLICY_ENV = "LIGHTNING_COMPRESS_INT8_KERNELS"
POLICIES = ("auto", "always", "never")
_FUSED_PARENTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (one float scale per output row) and int8 dynamic activations."""

    qweight: Tensor
    weight_scale: Tensor
    bias: Tensor | None

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

    @property
    def weight(self) -> Tensor:
        """The dequantized float weight ``(out, in)``, computed on each access, for code that reads ``.weight``
        (shape / dtype checks, fused fast paths); computing with it runs float kernels."""
        return self.dequantized_weight()

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


@dataclass(frozen=True)
class KernelDecision:
    """Whether :class:`Int8Linear` is used for one layer shape on this machine, and why."""

    use_int8: bool
    reason: str
    int8_ms: float | None = None
    float_ms: float | None = None


_DECISIONS: dict[tuple[int, int, int, str, int], KernelDecision] = {}


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # torch < 2.1
        return "unknown"


def int8_kernel_decision(
    in_features: int, out_features: int, *, batch: int = SELF_TEST_BATCH, device: str | torch.device = "cpu"
) -> KernelDecision:
    """Self-test of the int8 path for an ``in_features -> out_features`` layer at ``batch`` rows on ``device``:
    correct (within the activation-rounding bound of ``F.linear`` on the dequantized weight) and at least
    ``SPEED_MARGIN`` x faster than float. Cached per (shape, batch, device, threads) for the process."""
    check_number("in_features", in_features, low=1, integer=True)
    check_number("out_features", out_features, low=1, integer=True)
    check_number("batch", batch, low=1, integer=True)
    device = torch.device(device)
    key = (in_features, out_features, batch, str(device), torch.get_num_threads())
    if key not in _DECISIONS:
        _DECISIONS[key] = _self_test(in_features, out_features, batch, device)
    return _DECISIONS[key]


@torch.inference_mode()
def _self_test(in_features: int, out_features: int, batch: int, device: torch.device) -> KernelDecision:
    where = (f"{in_features}->{out_features} at batch {batch} on this {device.type.upper()} (capability "
             f"{cpu_capability()}, {torch.get_num_threads()} thread(s))")
    if not has_int8_matmul():
        return KernelDecision(False, f"this torch has no torch._int_mm ({where})")
    gen = torch.Generator().manual_seed(0)
    qweight = torch.randint(-127, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
    layer = Int8Linear(qweight, torch.rand(out_features, generator=gen) * 1e-2 + 1e-3).to(device)
    x = torch.randn(batch, in_features, generator=gen).to(device)
    weight = layer.dequantized_weight()
    try:
        out = layer(x)
    except RuntimeError as err:
        return KernelDecision(False, f"torch._int_mm failed: {err} ({where})")
    ref = F.linear(x, weight)
    x_scale = x.abs().amax(dim=1, keepdim=True) / _ACT_QMAX
    bound = x_scale / 2 * weight.abs().sum(dim=1) + 1e-5 * (x.abs() @ weight.abs().t()) + 1e-6
    excess = float((out - ref).abs().sub(bound).max())
    if excess > 0:
        return KernelDecision(False, f"torch._int_mm gave wrong results (error {excess:.3g} above the rounding bound; "
                                     f"{where})")
    int8_ms, float_ms = _time_pair(lambda: layer(x), lambda: F.linear(x, weight), device)
    speedup = float_ms / int8_ms
    verdict = (f"torch._int_mm {int8_ms:.3f} ms vs float F.linear {float_ms:.3f} ms ({speedup:.2f}x, needs >= "
               f"{SPEED_MARGIN:g}x) for {where}")
    return KernelDecision(speedup >= SPEED_MARGIN, verdict, int8_ms, float_ms)


def _time_pair(a: Callable[[], object], b: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Best of 3 interleaved rounds of each callable (ms), after one warm-up call; rounds stop early once one side
    is 3x the other (the answer is clear) or 0.5 s has gone."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = [float("inf"), float("inf")]
    a(), b()
    sync()
    start = time.perf_counter()
    for _ in range(3):
        for i, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
        ratio = max(best) / min(best)
        if ratio > 3 or time.perf_counter() - start > 0.5:
            break
    return 1e3 * best[0], 1e3 * best[1]


class Int8SwapResult(list[str]):
    """The names swapped (a list, as before), plus ``skipped``: quantized Linear layers kept float -> why."""

    def __init__(self, swapped: list[str], skipped: dict[str, str]) -> None:
        super().__init__(swapped)
        self.skipped = skipped


def _policy() -> str:
    policy = os.environ.get(POLICY_ENV, "auto").strip().lower() or "auto"
    if policy not in POLICIES:
        raise ValueError(f"environment variable {POLICY_ENV} must be one of {list(POLICIES)}, got {policy!r}")
    return policy


def swap_int8_linear(
    model: nn.Module,
    quantized: Mapping[str, QuantizedTensor],
    *,
    self_test: bool = True,
    batch: int = SELF_TEST_BATCH,
) -> Int8SwapResult:
    """Replace each ``nn.Linear`` submodule whose ``<name>.weight`` is in ``quantized`` by an :class:`Int8Linear` on
    the Linear's device -- only where that is faster here (a bare Linear model is left as it is).

    Kept float, with one warning listing each layer and why: codes with no int8 form (per-group scales, 8-bit
    asymmetric), Linears inside a Transformer / MultiheadAttention block, and (``self_test=True``, the default)
    shapes whose int8 self-test at ``batch`` rows is not faster than float on this CPU (see
    :func:`int8_kernel_decision`). ``self_test=False`` swaps every eligible layer without timing. Returns the names
    swapped (a list) with ``.skipped``: name -> reason.
    """
    check_number("batch", batch, low=1, integer=True)
    policy = _policy()
    swapped: list[str] = []
    skipped: dict[str, str] = {}
    parents = {name: module for name, module in model.named_modules()}
    for name, module in list(model.named_modules()):
        qt = quantized.get(f"{name}.weight" if name else "weight")
        if not name or qt is None or not isinstance(module, nn.Linear):
            continue
        parent = parents.get(name.rpartition(".")[0])
        if type(module) is not nn.Linear:
            skipped[name] = f"{type(module).__name__} is a Linear subclass its owner may read `.weight` from"
        elif isinstance(parent, _FUSED_PARENTS):
            skipped[name] = (f"inside {type(parent).__name__}, whose fused fast path reads `.weight` directly and "
                             "would bypass the int8 kernel")
        elif qt.int_weight() is None:
            skipped[name] = (f"{qt.spec.bits}-bit {qt.spec.granularity} codes (symmetric={qt.spec.symmetric}) have "
                             "no int8 form with one scale per row (export_onnx runs them on MatMulNBits)")
        elif policy == "never":
            skipped[name] = f"{POLICY_ENV}=never"
        else:
            if self_test and policy == "auto":
                decision = int8_kernel_decision(module.in_features, module.out_features, batch=batch,
                                                device=module.weight.device)
                if not decision.use_int8:
                    skipped[name] = decision.reason
                    continue
            new = Int8Linear.from_quantized(module, qt).to(module.weight.device)
            _set_submodule(model, name, new)
            swapped.append(name)
    if skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        warnings.warn(f"Int8Linear: {len(skipped)} quantized Linear layer(s) kept float kernels -- {reasons}",
                      stacklevel=2)
    return Int8SwapResult(swapped, skipped)


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
