"""The MSE clipping search: per (row, group), the range ``[lo, hi]`` whose quantization error is smallest. No Lightning.

Two implementations of the same objective ``sum((dequantize(quantize(x)) - x)^2)`` per (row, group):

- :func:`exhaustive_mse_search` (the reference, as it was): each of the ``mse_grid`` clipping ratios
  ``r`` in ``linspace(1, MSE_MIN_RATIO, mse_grid)`` is one full quantize / dequantize pass over the whole tensor.
  About 12 memory-bound passes per ratio: ~150x the cost of min/max at ``mse_grid=80``.
- :func:`mse_search` (what ``calibration="mse"`` runs) finds an equal or lower error in a fraction of the work:

  1. **coarse**: every ``k``-th ratio of the same grid (``k = ceil(sqrt(mse_grid))``, the first and last included);
  2. **fine**: per (row, group), around its *two* best coarse ratios (the error is not unimodal in the ratio:
     rounding makes it jagged) every ``k // 3``-th grid ratio within one coarse step, then every grid ratio within
     ``k // 3`` of the best so far;
  3. **least-squares scale** (Lloyd): with the codes ``q`` of the best ratio fixed, the scale minimizing
     ``|x - s (q - z)|^2`` is ``s* = <x, q - z> / |q - z|^2`` (a continuous value, off the grid); re-rounding at
     ``s*`` cannot increase the error (the codes of ``s`` are still valid at ``s*``, and rounding to nearest is the
     best code per element), so each step is kept only where it measures lower. Two steps.

  Steps 1-2 evaluate 22 ratios instead of 80 (at ``mse_grid=80``) and step 3 usually ends below the
  best grid point, which is how the error comes out *at most* the exhaustive grid's (tests check it on random and
  trained weights). Each evaluation runs on a chunk of rows small enough to stay in cache (``CHUNK_ELEMENTS``), with
  in-place ops, so a ratio costs a few cache-resident ops instead of a dozen passes through memory.

Both return ``(lo, hi)`` (float32, ``(rows, groups)``) that :func:`~.primitives.choose_qparams` turns back into the
scale (and integer zero point) that was evaluated.

Calibration *data* (GPTQ, smoothing): :func:`take_batches` keeps a bounded number of batches, :func:`feed` is how a
batch goes into the model by default (dicts as keyword arguments), :func:`to_device` moves a batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.quantization.primitives import (
    MSE_MIN_RATIO,
    QuantSpec,
    choose_qparams,
    dequantize,
    int_range,
    quantize,
)

CHUNK_ELEMENTS = 1 << 18  # elements per evaluation chunk: 1 MiB of float32 (fewer, larger ops; measured best)
LLOYD_STEPS = 2


def exhaustive_mse_search(x: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The reference grid search: every ratio of the grid, one pass over the whole tensor each."""
    best_err = torch.full(lo.shape, float("inf"), device=x.device)
    best_ratio = torch.ones_like(lo)
    for ratio in torch.linspace(1.0, MSE_MIN_RATIO, spec.mse_grid).tolist():
        scale, zero = choose_qparams(lo * ratio, hi * ratio, spec)
        q = quantize(x, scale, zero, spec.bits, spec.symmetric)
        err = (dequantize(q, scale, zero) - x).square_().sum(dim=-1)  # (rows, groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return lo * best_ratio, hi * best_ratio


def mse_search(
    x: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Coarse-to-fine grid search plus least-squares scale refinement; ``x`` is ``(rows, groups, group_len)``.

    ``weights`` (broadcastable to ``x``, non-negative; e.g. ``diag(H)`` per input column, the mean square of that
    input): the error minimized is then ``sum(weights * (dequantize(quantize(x)) - x)^2)`` per (row, group), the
    error the layer's *output* sees from each column alone, instead of the plain weight-space MSE."""
    rows, groups, length = x.shape
    flat_x = x.reshape(rows * groups, length).float()
    flat_w = None if weights is None else weights.float().expand(rows, groups, length).reshape(rows * groups, length)
    flat_lo, flat_hi = lo.reshape(-1).float(), hi.reshape(-1).float()
    out_lo, out_hi = torch.empty_like(flat_lo), torch.empty_like(flat_hi)
    step = max(1, CHUNK_ELEMENTS // max(1, length))
    for start in range(0, flat_x.shape[0], step):
        stop = min(start + step, flat_x.shape[0])
        out_lo[start:stop], out_hi[start:stop] = _search_chunk(
            flat_x[start:stop], flat_lo[start:stop], flat_hi[start:stop], spec,
            None if flat_w is None else flat_w[start:stop],
        )
    return out_lo.reshape(lo.shape), out_hi.reshape(hi.shape)


def _errors(
    x: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec, codes: bool = False, w: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Squared error (times ``w``) per row of ``x`` (n, L) at per-row ``scale`` / ``zero``; with ``codes``, also
    ``q - z``."""
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    s = scale.float().unsqueeze(-1)
    t = x / s
    t.round_()
    if zero is None:
        t.clamp_(qmin, qmax)
    else:
        z = zero.float().unsqueeze(-1)
        t.clamp_(qmin - z, qmax - z)  # codes minus zero point, so that t * s is the reconstruction
    centred = t.clone() if codes else t
    t.mul_(s).sub_(x).square_()
    if w is not None:
        t.mul_(w)
    return t.sum(-1), centred


def _qparams_at(lo: Tensor, hi: Tensor, ratio: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    return choose_qparams(lo * ratio, hi * ratio, spec)


def _search_chunk(
    x: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec, w: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    grid = torch.linspace(1.0, MSE_MIN_RATIO, spec.mse_grid)
    k = max(1, math.ceil(math.sqrt(spec.mse_grid)))
    coarse = sorted(set(range(0, spec.mse_grid, k)) | {spec.mse_grid - 1})
    coarse_err = torch.stack([_errors(x, *_qparams_at(lo, hi, grid[i], spec), spec, w=w)[0] for i in coarse], dim=1)
    best_err, pos = coarse_err.min(dim=1)  # 1. coarse
    coarse_idx = torch.tensor(coarse)
    best_idx = coarse_idx[pos]
    centres = [best_idx]
    if len(coarse) > 2:  # the runner-up basin too: the error is not unimodal in the ratio (rounding)
        centres.append(coarse_idx[coarse_err.scatter(1, pos.unsqueeze(1), float("inf")).argmin(dim=1)])
    mid = max(1, k // 3)
    # 2. fine: around the two best coarse ratios every `mid` grid steps, then every step around the best
    for centres_now, offsets in (
        (centres, [o for o in range(-k + mid, k, mid) if o]),
        (None, [o for o in range(-mid + 1, mid) if o]),
    ):
        for centre in centres_now or [best_idx.clone()]:
            for offset in offsets:
                idx = (centre + offset).clamp(0, spec.mse_grid - 1)
                err, _ = _errors(x, *_qparams_at(lo, hi, grid[idx], spec), spec, w=w)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_idx = torch.where(better, idx, best_idx)
    ratio = grid[best_idx]
    best_lo, best_hi = lo * ratio, hi * ratio
    scale, zero = choose_qparams(best_lo, best_hi, spec)
    for _ in range(LLOYD_STEPS):  # 3. least-squares scale for the current codes
        _, centred = _errors(x, scale, zero, spec, codes=True)
        wc = centred if w is None else centred * w  # weighted least squares: s* = <w x, c> / <w c, c>
        denom = (wc * centred).sum(-1)
        ls_scale = torch.where(denom > 0, (x * wc).sum(-1) / denom.clamp(min=1e-30), scale.float())
        cand_lo, cand_hi = _range_of(ls_scale, zero, spec)
        cand_scale, cand_zero = choose_qparams(cand_lo, cand_hi, spec)
        err, _ = _errors(x, cand_scale, cand_zero, spec, w=w)
        better = (err < best_err) & (ls_scale > 0)
        if not bool(better.any()):
            break
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, cand_lo, best_lo), torch.where(better, cand_hi, best_hi)
        scale, zero = choose_qparams(best_lo, best_hi, spec)
    return best_lo, best_hi


def _range_of(scale: Tensor, zero: Tensor | None, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The ``(lo, hi)`` that :func:`choose_qparams` maps back to ``scale`` (and the integer ``zero``)."""
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    if zero is None:
        half = scale * ((qmax - qmin) / 2)
        return -half, half
    z = zero.float()
    return (qmin - z) * scale, (qmax - z) * scale


# ---------------------------------------------------------------------------------------------- calibration data
def feed(model: nn.Module, batch: Any) -> Any:
    """The default way a calibration batch goes into the model: a mapping as keyword arguments
    (``model(**batch)``: tokenizer output), a tuple / list as ``(inputs, targets, ...)`` (``model(batch[0])``, the
    package's evaluation convention), anything else as the one input (``model(batch)``)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def run_with_hooks(model: nn.Module, batch: Any, run: Callable[[nn.Module, Any], Any], handles: list[Any]) -> None:
    """One forward of ``batch`` without gradients while the hooks behind ``handles`` record what they need; the
    hooks are removed afterwards, whatever happens."""
    try:
        with torch.no_grad():
            run(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in mappings, tuples, lists) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def take_batches(data: Iterable[Any], limit: int, argument: str = "calibration_data") -> list[Any]:
    """At most ``limit`` batches of ``data``, kept in a list (every calibration pass reads them again)."""
    if isinstance(data, (str, bytes, Tensor)) or not isinstance(data, Iterable):
        raise TypeError(
            f"`{argument}` must be an iterable of batches (a DataLoader, a list of tensors or of dicts), "
            f"got {type(data).__name__}"
        )
    batches = list(itertools.islice(data, limit))
    if not batches:
        raise ValueError(f"`{argument}` yielded no batch; GPTQ / smoothing need at least one")
    return batches
