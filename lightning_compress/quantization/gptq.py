"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
weights rounded one input column at a time, each column's rounding error spread over the columns not yet rounded,
weighted by the layer's input Hessian, so that the layer's *output* on calibration data moves as little as possible.
Pure PyTorch, no Lightning.

For a layer ``y = W x`` (``W``: ``(rows, cols)``; a Conv as ``W`` ``(out, in * k)`` on unfolded patches) the
objective ``|W X - W_hat X|^2`` has Hessian ``H = 2 X^T X / n`` over the ``n`` calibration rows of ``X``
(:class:`HessianAccumulator`). :func:`gptq_quantize`:

1. ``H += damp * mean(diag H) * I`` (dampening); inputs that were always zero (``H_jj = 0``) get ``H_jj = 1``;
2. ``U = chol(H^-1)^T`` (upper Cholesky factor of the inverse): row ``j`` of ``U`` is how the error of column ``j``
   is spread over the later columns (the "inverse Hessian" of the paper, in its stable Cholesky form);
3. per column ``j``: codes ``q_j`` by round-to-nearest with the column's (row, group) scale, error
   ``e = (w_j - w_hat_j) / U_jj``, then ``W[:, k] -= e U_jk`` for the later ``k``; done in lazy blocks of
   ``block_size`` columns (the update of the columns beyond the block is one matmul per block).

Scales: per-channel / per-tensor ranges are calibrated on the original weight; per-group ranges are calibrated, as
GPTQ does, when the group's first column is reached, on the group's weights *as updated so far* (so the scale
fits what is actually rounded), with the spec's calibration (``minmax``, ``percentile`` or the ``mse`` search).

Pruned weights (exact zeros of the input weight) get the code of 0.0 whatever the updates made of them, and their
error is spread like any other (SparseGPT's rule), so sparsity is kept exactly. The output is the same
:class:`~.primitives.QuantizedTensor` as round-to-nearest: export and load are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.core.validation import check_bool, check_number
from lightning_compress.quantization.primitives import (
    QuantizedTensor,
    QuantSpec,
    calibrate,
    choose_qparams,
    code_dtype,
    grouped_view,
    int_range,
)

DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (the paper's default)
BLOCK_SIZE = 128  # lazy-batch width: columns updated together before one matmul pushes the error further


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ runs. Checked on construction."""

    damp: float = DAMP  # raise it (0.1) when calibration has few tokens per input column: H is then ill-conditioned
    block_size: int = BLOCK_SIZE
    act_order: bool = True  # largest-input columns first, static group scales (better on outlier-heavy inputs)
    sequential: bool = True  # each layer's Hessian from the quantized earlier layers (one forward per layer group);
    # False: every Hessian from the float model in one forward (much faster; measured about as good on MiniLM)

    def __post_init__(self) -> None:
        check_number("damp", self.damp, low=0.0, high=1.0)
        check_number("block_size", self.block_size, low=1, integer=True)
        check_bool("act_order", self.act_order)
        check_bool("sequential", self.sequential)


class HessianAccumulator:
    """``sum x x^T`` over calibration rows ``x`` (float32) and their count; :meth:`hessian` is ``2 X^T X / n``."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(columns, columns, device=device)
        self.count = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().reshape(-1, self.xtx.shape[0]).to(self.xtx.device, torch.float32)
        self.xtx.addmm_(rows.t(), rows)
        self.count += rows.shape[0]

    def hessian(self) -> Tensor:
        return self.xtx * (2.0 / max(1, self.count))


@dataclass(frozen=True)
class _ConvGeometry:
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    stride: tuple[int, int]


def conv_geometry(module: nn.Module) -> _ConvGeometry | None:
    """Unfold parameters of a Conv1d / Conv2d that GPTQ supports (zero padding, one group); ``None`` otherwise."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.groups != 1 or module.padding_mode != "zeros":
        return None
    padding = module.padding
    if isinstance(padding, str):
        if padding != "valid":
            return None  # "same" pads asymmetrically for even kernels: not expressible in F.unfold
        padding = (0,) * len(module.kernel_size)

    def two(value: tuple[int, ...]) -> tuple[int, int]:
        return (1, value[0]) if isinstance(module, nn.Conv1d) else (value[0], value[1])

    pad = (0, padding[0]) if isinstance(module, nn.Conv1d) else (padding[0], padding[1])
    return _ConvGeometry(two(module.kernel_size), two(module.dilation), pad, two(module.stride))


def layer_input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows ``X`` (``(n, cols)``) with ``module``'s output = ``X W^T`` (+ bias): Linear inputs as they are,
    Conv1d / Conv2d inputs unfolded into patches (``C * kernel`` columns, in the weight's flattening order)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        geo = conv_geometry(module)
        if geo is None:
            raise ValueError(f"GPTQ does not support this convolution: {module}")
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-2)  # (B, C, L) -> (B, C, 1, L)
        if x.dim() == 3:
            x = x.unsqueeze(0)  # unbatched input
        patches = F.unfold(x, geo.kernel, dilation=geo.dilation, padding=geo.padding, stride=geo.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B * L, C * k)
    return x.reshape(-1, x.shape[-1])


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
    act_order: bool = True,
) -> QuantizedTensor:
    """GPTQ codes and qparams of ``weight`` (dim 0 = output rows, the rest flattened into ``cols`` columns) for
    the input Hessian ``hessian`` (``(cols, cols)``). Exact zeros of ``weight`` stay exactly zero.

    ``act_order``: columns are rounded in decreasing ``H_jj`` order (largest inputs first, while the most columns
    are left to absorb their error); per-group scales are then calibrated on the original weights ("static groups",
    since a group's columns are no longer rounded together)."""
    check_number("damp", damp, low=0.0, high=1.0)
    check_number("block_size", block_size, low=1, integer=True)
    shape = tuple(weight.shape)
    W = weight.detach().reshape(shape[0], -1).float().clone()  # (rows, cols)
    rows, cols = W.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"`hessian` must be ({cols}, {cols}) for a weight shaped {shape}, got {tuple(hessian.shape)}")
    groups_view = grouped_view(W, spec.granularity, spec.group_size)  # raises on a group size that does not divide
    per_group = spec.granularity == "per_group"
    dynamic_groups = per_group and not act_order
    if dynamic_groups:
        scales = torch.empty(rows, cols // spec.group_size, device=W.device)  # float32; float16 at the end
        zeros = None if spec.symmetric else torch.empty_like(scales, dtype=torch.uint8)
    else:
        scales, zeros = choose_qparams(*calibrate(groups_view, spec), spec)  # (rows | 1, groups)
    H = hessian.to(W.device, torch.float32)
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // spec.group_size if per_group else torch.zeros_like(perm)  # group of each permuted column
    pruned = W == 0
    pruned = pruned if bool(pruned.any()) else None
    U = _inverse_cholesky(H, damp)  # (cols, cols), upper triangular
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    codes = torch.empty(rows, cols, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        err_block = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            g = int(group_of[c])
            if dynamic_groups and c % spec.group_size == 0:  # GPTQ's rule: calibrate the group on its current values
                end = c + spec.group_size
                values = W1[:, j : end - i1] if end <= i2 else torch.cat([W1[:, j:], W[:, i2:end]], dim=1)
                if pruned is not None:
                    values = values.masked_fill(pruned[:, c:end], 0.0)
                scale, zero = choose_qparams(*calibrate(values.unsqueeze(1), spec), spec)
                scales[:, g] = scale[:, 0]
                if zeros is not None and zero is not None:
                    zeros[:, g] = zero[:, 0]
            s_col = scales[:, g].float().expand(rows)
            z_col = None if zeros is None else zeros[:, g].float().expand(rows)
            w = W1[:, j]
            q = torch.round(w / s_col)
            if z_col is not None:
                q += z_col
            q.clamp_(qmin, qmax)
            if pruned is not None:
                q = torch.where(pruned[:, c], torch.zeros_like(q) if z_col is None else z_col, q)
            codes[:, c] = q
            w_hat = (q - z_col) * s_col if z_col is not None else q * s_col  # = dequantize(), same formula
            err = (w - w_hat) / U1[j, j]
            W1[:, j:].sub_(torch.outer(err, U1[j, j:]))
            err_block[:, j] = err
        W[:, i2:].sub_(err_block @ U[i1:i2, i2:])
    unpermuted = torch.empty_like(codes)
    unpermuted[:, perm] = codes
    q_codes = unpermuted.to(code_dtype(spec.symmetric)).reshape(shape)
    if dynamic_groups and spec.scale_dtype == "float16" and bool((scales <= torch.finfo(torch.float16).max).all()):
        scales = scales.half()  # exact: choose_qparams already rounded each scale up to a float16 value
    return QuantizedTensor(q_codes, scales, zeros, spec, shape, weight.dtype)


def _inverse_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; dampening grows tenfold (up to 4 times) while
    the factorization fails (an ill-conditioned H from too few calibration rows)."""
    H = hessian.clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0  # an input that was always zero: its column is rounded to nearest, its error goes nowhere
    mean = float(diag.mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    factor = damp
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(H + eye * (factor * mean))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return U
        factor = max(factor * 10, 1e-6)
    raise RuntimeError(f"the layer's input Hessian is not positive definite even with dampening {factor / 10:.3g}")


# ---------------------------------------------------------------------------------------------- the model driver
class _StopForward(Exception):
    """Raised by a hook once every layer of the pass has seen its input: the rest of the forward is not needed."""


def _mha_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    names = ("query", "key", "value")
    values = [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]
    if values[0] is values[1] and values[1] is values[2]:
        return [values[0]]  # self-attention: one input (and one Hessian) for the fused q/k/v projection
    return values


def gptq_supports(module: nn.Module) -> str:
    """Why GPTQ cannot quantize ``module`` (``""`` when it can); the caller rounds such layers to nearest."""
    if isinstance(module, nn.MultiheadAttention):
        return "" if module.in_proj_weight is not None else "MultiheadAttention with separate q/k/v weights"
    if isinstance(module, nn.Linear):
        return ""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "" if conv_geometry(module) is not None else "grouped, non-zero-padded or 'same'-padded convolution"
    return f"no input Hessian for a {type(module).__name__}"


def _input_rows(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    if isinstance(module, nn.MultiheadAttention):
        return [x.reshape(-1, x.shape[-1]) for x in _mha_inputs(args, kwargs)]
    return [layer_input_rows(module, args[0] if args else next(iter(kwargs.values())))]


def gptq_model(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    specs: Mapping[str, QuantSpec],
    batches: Sequence[Any],
    run: Callable[[nn.Module, Any], Any],
    config: GPTQConfig = GPTQConfig(),
) -> tuple[dict[str, QuantizedTensor], dict[str, str]]:
    """Quantize ``layers`` of ``model`` with GPTQ, in the order the forward reaches them, each from inputs that the
    already quantized layers produced. Layers that read the very same input tensor (q / k / v projections) share one
    pass. The dequantized weights are written in place. Returns the quantized tensors by layer name, and, for layers
    left to the caller (not supported, or not reached by ``run(model, batch)``), the reason."""
    notes = {name: why for name, module in layers.items() if (why := gptq_supports(module))}
    todo = {name: module for name, module in layers.items() if name not in notes}
    order, calls, keys = _probe(model, todo, batches[0], run)
    for name in todo:
        if name not in calls:
            notes[name] = "not called as a module by the calibration forward (used functionally?)"
    passes: dict[tuple[int, ...], list[str]] = {}
    for name in order:
        passes.setdefault(keys[name] if config.sequential else (), []).append(name)
    out: dict[str, QuantizedTensor] = {}
    for members in passes.values():
        hessians = _accumulate(model, {n: todo[n] for n in members}, {n: calls[n] for n in members}, batches, run)
        for name in members:
            module = todo[name]
            weight = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
            parts = hessians[name]
            if len(parts) > 1 and specs[name].granularity == "per_tensor":
                notes[name] = "per_tensor scale with different q / k / v inputs"
                continue
            chunks = weight.detach().chunk(len(parts), dim=0)
            qts = [gptq_quantize(w, h.hessian(), specs[name], damp=config.damp, block_size=config.block_size,
                                 act_order=config.act_order)
                   for w, h in zip(chunks, parts)]
            qt = qts[0] if len(qts) == 1 else _concat_rows(qts, weight)
            with torch.no_grad():
                weight.copy_(qt.dequantize())
            out[name] = qt
    return out, notes


def _concat_rows(parts: Sequence[QuantizedTensor], weight: Tensor) -> QuantizedTensor:
    zeros = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts])  # type: ignore[misc]
    return QuantizedTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zeros,
                           parts[0].spec, tuple(weight.shape), weight.dtype)


def _probe(
    model: nn.Module, layers: Mapping[str, nn.Module], batch: Any, run: Callable[[nn.Module, Any], Any]
) -> tuple[list[str], dict[str, int], dict[str, tuple[int, ...]]]:
    """One forward: the order layers are first called in, how often each is called, and the identity of each one's
    first input (the tensors are kept alive meanwhile, so the ids cannot be reused)."""
    order: list[str] = []
    calls: dict[str, int] = {}
    keys: dict[str, tuple[int, ...]] = {}
    alive: list[Any] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in keys:
                first = _mha_inputs(args, kwargs) if isinstance(module, nn.MultiheadAttention) else [args[0]]
                alive.append(first)
                keys[name] = tuple(id(x) for x in first)
                order.append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    try:
        with torch.no_grad():
            run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order, calls, keys


def _accumulate(
    model: nn.Module,
    members: Mapping[str, nn.Module],
    expected: Mapping[str, int],
    batches: Sequence[Any],
    run: Callable[[nn.Module, Any], Any],
) -> dict[str, list[HessianAccumulator]]:
    """The input Hessians of ``members`` over ``batches``; each forward stops once every member has been called as
    often as in the probe."""
    acc: dict[str, list[HessianAccumulator]] = {}
    seen: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            rows = _input_rows(module, args, kwargs)
            if name not in acc:
                device = next(module.parameters()).device
                acc[name] = [HessianAccumulator(r.shape[1], device) for r in rows]
            for a, r in zip(acc[name], rows):
                a.add(r)
            seen[name] = seen.get(name, 0) + 1
            if all(seen.get(n, 0) >= expected[n] for n in members):
                raise _StopForward
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in members.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                try:
                    run(model, batch)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return acc
