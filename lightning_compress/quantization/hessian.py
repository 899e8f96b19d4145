"""What a layer sees during calibration: its input rows and their Hessian ``2 X^T X / n`` (for GPTQ). No Lightning.

- :func:`layer_input_rows`: the rows ``X`` with ``output = X W^T`` -- Linear inputs as they are, Conv1d / Conv2d inputs
  unfolded into patches (in the weight's flattening order); :class:`HessianAccumulator` sums ``X^T X`` over batches.
- :func:`probe_layers`: one forward that records the order layers are reached in, how often, and which ones read the
  very same input tensor (q / k / v projections: one pass can serve them all).
- :func:`accumulate_hessians`: the Hessians of some layers over the calibration batches, each forward stopped as
  soon as every one of them has seen its input (hooks raise :class:`StopForward`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.quantization.calibration import run_with_hooks


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


def gptq_supports(module: nn.Module) -> str:
    """Why GPTQ cannot quantize ``module`` (``""`` when it can); the caller rounds such layers to nearest."""
    if isinstance(module, nn.MultiheadAttention):
        return "" if module.in_proj_weight is not None else "MultiheadAttention with separate q/k/v weights"
    if isinstance(module, nn.Linear):
        return ""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "" if conv_geometry(module) is not None else "grouped, non-zero-padded or 'same'-padded convolution"
    return f"no input Hessian for a {type(module).__name__}"


class StopForward(Exception):
    """Raised by a hook once every layer of the pass has seen its input: the rest of the forward is not needed."""


def mha_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    names = ("query", "key", "value")
    values: list[Tensor] = [args[i] if i < len(args) else kwargs[name] for i, name in enumerate(names)]
    if values[0] is values[1] and values[1] is values[2]:
        return [values[0]]  # self-attention: one input (and one Hessian) for the fused q/k/v projection
    return values


def input_rows(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    if isinstance(module, nn.MultiheadAttention):
        return [x.reshape(-1, x.shape[-1]) for x in mha_inputs(args, kwargs)]
    return [layer_input_rows(module, args[0] if args else next(iter(kwargs.values())))]


def probe_layers(
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
                first = mha_inputs(args, kwargs) if isinstance(module, nn.MultiheadAttention) else [args[0]]
                alive.append(first)
                keys[name] = tuple(id(x) for x in first)
                order.append(name)
        return record

    run_with_hooks(model, batch, run, [m.register_forward_pre_hook(hook(n), with_kwargs=True)
                                       for n, m in layers.items()])
    return order, calls, keys


def accumulate_hessians(
    model: nn.Module, batches: Sequence[Any], run: Callable[[nn.Module, Any], Any], *,
    members: Mapping[str, nn.Module], expected: Mapping[str, int],
) -> dict[str, list[HessianAccumulator]]:
    """The input Hessians of ``members`` over ``batches``; each forward stops once every member has been called as
    often as in the probe."""
    acc: dict[str, list[HessianAccumulator]] = {}
    seen: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            rows = input_rows(module, args, kwargs)
            if name not in acc:
                device = next(module.parameters()).device
                acc[name] = [HessianAccumulator(r.shape[1], device) for r in rows]
            for a, r in zip(acc[name], rows):
                a.add(r)
            seen[name] = seen.get(name, 0) + 1
            if all(seen.get(n, 0) >= expected[n] for n in members):
                raise StopForward
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in members.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                try:
                    run(model, batch)
                except StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return acc
