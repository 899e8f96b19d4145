"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
weights rounded one input column at a time, each column's rounding error spread over the columns not yet rounded,
weighted by the layer's input Hessian, so that the layer's *output* on calibration data moves as little as possible.
Pure PyTorch, no Lightning.

For a layer ``y = W x`` (``W``: ``(rows, cols)``; a Conv as ``W`` ``(out, in * k)`` on unfolded patches) the
objective ``|W X - W_hat X|^2`` has Hessian ``H = 2 X^T X / n`` over the ``n`` calibration rows of ``X``
(:class:`~.hessian.HessianAccumulator`). :func:`gptq_quantize`:

1. ``H += damp * mean(diag H) * I`` (dampening); inputs that were always zero (``H_jj = 0``) get ``H_jj = 1``;
2. ``U = chol(H^-1)^T`` (upper Cholesky factor of the inverse): row ``j`` of ``U`` is how the error of column ``j``
   is spread over the later columns (the "inverse Hessian" of the paper, in its stable Cholesky form);
3. per column ``j``: codes ``q_j`` by round-to-nearest with the column's (row, group) scale, error
   ``e = (w_j - w_hat_j) / U_jj``, then ``W[:, k] -= e U_jk`` for the later ``k``; done in lazy blocks of
   ``block_size`` columns (the update of the columns beyond the block is one matmul per block).

Scales: per-channel / per-tensor ranges are calibrated on the original weight; per-group ranges are calibrated, as
GPTQ does, when the group's first column is reached, on the group's weights *as updated so far* (so the scale
fits what is actually rounded), with the spec's calibration (``minmax``, ``percentile`` or the ``mse`` search).
With ``mse``, the search can weight each column's error by ``H_jj ** p`` (the mean square of its input, to a power):
``GPTQConfig.clip_powers`` lists the powers tried, one GPTQ run each, and the run with the lowest output error
``tr((W - W_hat) H (W - W_hat)^T)`` is kept (so a list containing 0, the plain MSE search, is never worse on it);
``GPTQConfig.try_unclipped`` (on by default) adds the plain min/max range as one more candidate, so MSE clipping
with GPTQ is never worse on that error than min/max either.

Pruned weights (exact zeros of the input weight) get the code of 0.0 whatever the updates made of them, and their
error is spread like any other (SparseGPT's rule), so sparsity is kept exactly. The output is the same
:class:`~.primitives.QuantizedTensor` as round-to-nearest: export and load are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.validation import check_bool, check_number
from lightning_compress.quantization.calibration import mse_search
from lightning_compress.quantization.checks import refuse_unreached
from lightning_compress.quantization.coverage import layer_weight
from lightning_compress.quantization.hessian import (
    accumulate_hessians,
    gptq_supports,
    probe_layers,
)
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
    clip_powers: tuple[float, ...] = (0.0,)  # calibration="mse": search error weighted by H_jj ** p, for each p one
    # GPTQ run, the lowest output error kept; (0.0, 0.5, 1.0): MiniLM int4/int3 g128 min cos +0.003/+0.006, 2x time
    try_unclipped: bool = True  # calibration="mse": one more GPTQ run with the unclipped (min/max) range, kept when
    # its output error is lower: clipping that minimizes the *weight* error can raise the *output* error (ResNet-18
    # int3 per-channel: relative logit error 0.111 with MSE clipping, 0.037 with min/max)

    def __post_init__(self) -> None:
        check_number("damp", self.damp, low=0.0, high=1.0)
        check_number("block_size", self.block_size, low=1, integer=True)
        check_bool("act_order", self.act_order)
        check_bool("sequential", self.sequential)
        check_bool("try_unclipped", self.try_unclipped)
        if not isinstance(self.clip_powers, tuple) or not self.clip_powers:
            raise TypeError(f"`clip_powers` must be a non-empty tuple of numbers, got {self.clip_powers!r}")
        for power in self.clip_powers:
            check_number("clip_powers[]", power, low=0.0, high=2.0)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
    act_order: bool = True,
    clip_power: float = 0.0,
) -> QuantizedTensor:
    """GPTQ codes and qparams of ``weight`` (dim 0 = output rows, the rest flattened into ``cols`` columns) for
    the input Hessian ``hessian`` (``(cols, cols)``). Exact zeros of ``weight`` stay exactly zero.

    ``act_order``: columns are rounded in decreasing ``H_jj`` order (largest inputs first, while the most columns
    are left to absorb their error); per-group scales are then calibrated on the original weights ("static groups",
    since a group's columns are no longer rounded together).

    ``clip_power`` (``spec.calibration == "mse"`` only; 0: plain): the clipping search minimizes
    ``sum_j H_jj ** clip_power (w_j - w_hat_j)^2`` per (row, group) instead of the weight MSE."""
    check_number("damp", damp, low=0.0, high=1.0)
    check_number("clip_power", clip_power, low=0.0, high=2.0)
    check_number("block_size", block_size, low=1, integer=True)
    shape = tuple(weight.shape)
    W = weight.detach().reshape(shape[0], -1).float().clone()  # (rows, cols)
    rows, cols = W.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"`hessian` must be ({cols}, {cols}) for a weight shaped {shape}, got {tuple(hessian.shape)}")
    groups_view = grouped_view(W, spec.granularity, spec.group_size)  # raises on a group size that does not divide
    per_group = spec.granularity == "per_group"
    dynamic_groups = per_group and not act_order
    H = hessian.to(W.device, torch.float32)
    col_weight = None
    if clip_power > 0 and spec.calibration == "mse":
        col_weight = torch.diagonal(H).clamp(min=0.0).pow(clip_power)
    if dynamic_groups:
        scales = torch.empty(rows, cols // spec.group_size, device=W.device)  # float32; float16 at the end
        zeros = None if spec.symmetric else torch.empty_like(scales, dtype=torch.uint8)
    else:
        scales, zeros = choose_qparams(*_calibrate(groups_view, spec, col_weight), spec)  # (rows | 1, groups)
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // spec.group_size if per_group else torch.zeros_like(perm)  # group of each permuted column
    is_zero = W == 0
    pruned = is_zero if bool(is_zero.any()) else None
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
                if end <= i2:
                    values = W1[:, j : end - i1]
                else:  # the group runs past the block: its later columns with this block's pending updates
                    later = W[:, i2:end] - err_block @ U[i1:i2, i2:end]
                    values = torch.cat([W1[:, j:], later], dim=1)
                if pruned is not None:
                    values = values.masked_fill(pruned[:, c:end], 0.0)
                w_group = None if col_weight is None else col_weight[c:end]
                scale, zero = choose_qparams(*_calibrate(values.unsqueeze(1), spec, w_group), spec)
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


def output_error(weight: Tensor, qt: QuantizedTensor, hessian: Tensor) -> float:
    """GPTQ's objective for a quantized ``weight``: ``tr((W - W_hat) H (W - W_hat)^T)``."""
    E = weight.detach().reshape(weight.shape[0], -1).float() - qt.dequantize().reshape(weight.shape[0], -1).float()
    return float(((E @ hessian.to(E)) * E).sum())


def gptq_best(weight: Tensor, hessian: Tensor, spec: QuantSpec, config: GPTQConfig = GPTQConfig()) -> QuantizedTensor:
    """:func:`gptq_quantize` once per ``config.clip_powers`` entry (once when the spec's calibration is not
    ``mse``: the power changes nothing), and with ``config.try_unclipped`` once more with the ``minmax`` range; the
    result with the lowest :func:`output_error` (the first on ties: MSE clipping before min/max)."""
    mse = spec.calibration == "mse"
    candidates = [(power, spec) for power in (config.clip_powers if mse else config.clip_powers[:1])]
    if mse and config.try_unclipped:
        candidates.append((0.0, replace(spec, calibration="minmax")))
    best: tuple[float, QuantizedTensor] | None = None
    for power, candidate in candidates:
        qt = gptq_quantize(weight, hessian, candidate, damp=config.damp, block_size=config.block_size,
                           act_order=config.act_order, clip_power=power)
        err = output_error(weight, qt, hessian) if len(candidates) > 1 else 0.0
        if best is None or err < best[0]:
            best = (err, qt)
    assert best is not None
    return best[1]


def _calibrate(groups: Tensor, spec: QuantSpec, col_weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`~.primitives.calibrate`; with ``col_weight`` (``(cols,)``) the MSE search weighted per column
    (per-tensor ranges mix rows and columns: unweighted)."""
    if col_weight is None or spec.granularity == "per_tensor":
        return calibrate(groups, spec)
    x = groups.float()
    lo, hi = torch.aminmax(x, dim=-1)
    return mse_search(x, lo, hi, spec, weights=col_weight.reshape(1, x.shape[1], x.shape[2]))


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
def gptq_model(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    specs: Mapping[str, QuantSpec],
    batches: Sequence[Any],
    run: Callable[[nn.Module, Any], Any],
    config: GPTQConfig = GPTQConfig(),
    hessians: dict[str, list[Tensor]] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[dict[str, QuantizedTensor], dict[str, str]]:
    """Quantize ``layers`` of ``model`` with GPTQ, in the order the forward reaches them, each from inputs that the
    already quantized layers produced. Layers that read the very same input tensor (q / k / v projections) share one
    pass. The dequantized weights are written in place. Returns the quantized tensors by layer name, and, for layers
    left to the caller (not supported, or not reached by ``run(model, batch)``), the reason. ``hessians``, when
    given, receives each quantized layer's input Hessians (on the CPU; several for a MultiheadAttention's q / k / v),
    so that :func:`gptq_weight` can quantize it again at another width without a forward. ``progress(done, total,
    name)`` is called after each layer (a progress bar's hook)."""
    notes = {name: why for name, module in layers.items() if (why := gptq_supports(module))}
    todo = {name: module for name, module in layers.items() if name not in notes}
    order, calls, keys = probe_layers(model, todo, batches[0], run)
    refuse_unreached(list(todo), calls)
    for name in todo:
        if name not in calls:
            notes[name] = "not called as a module by the calibration forward (used functionally?)"
    passes: dict[tuple[int, ...], list[str]] = {}
    for name in order:
        passes.setdefault(keys[name] if config.sequential else (), []).append(name)
    out: dict[str, QuantizedTensor] = {}
    total, done = sum(len(members) for members in passes.values()), 0
    for members in passes.values():
        group = {n: todo[n] for n in members}
        accumulated = accumulate_hessians(model, batches, run, members=group, expected={n: calls[n] for n in members})
        for name in members:
            done += 1
            if progress is not None:
                progress(done, total, name)
            module = todo[name]
            weight = layer_weight(name, module)  # in_proj_weight of an attention, else weight
            parts = [h.hessian() for h in accumulated[name]]
            if len(parts) > 1 and specs[name].granularity == "per_tensor":
                notes[name] = "per_tensor scale with different q / k / v inputs"
                continue
            qt = gptq_weight(weight, parts, specs[name], config, name)
            with torch.no_grad():
                weight.copy_(qt.dequantize())
            out[name] = qt
            if hessians is not None:
                hessians[name] = [h.cpu() for h in parts]
    return out, notes


def gptq_weight(
    weight: Tensor, hessians: Sequence[Tensor], spec: QuantSpec, config: GPTQConfig, layer: str = "the layer"
) -> QuantizedTensor:
    """:func:`gptq_best` of ``weight`` for its input Hessian; with several (a MultiheadAttention's q / k / v, each
    fed its own input), of each equal row chunk for its Hessian, the chunks concatenated. A Hessian that is not
    finite, or not positive definite even with dampening, raises naming ``layer``."""
    if not all(bool(h.isfinite().all()) for h in hessians):
        raise ValueError(f"layer {layer!r}: its input Hessian holds NaN / inf: the calibration inputs that reached it "
                         "were not finite (check `calibration_data` and the layers before it)")
    chunks = weight.detach().chunk(len(hessians), dim=0)
    try:
        qts = [gptq_best(w, h.to(w.device), spec, config) for w, h in zip(chunks, hessians)]
    except RuntimeError as err:
        raise RuntimeError(f"layer {layer!r}: {err}; raise `GPTQConfig.damp` or give more calibration data") from err
    return qts[0] if len(qts) == 1 else _concat_rows(qts, weight)


def _concat_rows(parts: Sequence[QuantizedTensor], weight: Tensor) -> QuantizedTensor:
    zeros = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts])  # type: ignore[misc]
    return QuantizedTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zeros,
                           parts[0].spec, tuple(weight.shape), weight.dtype)
