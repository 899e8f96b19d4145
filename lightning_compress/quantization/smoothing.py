"""SmoothQuant-style smoothing (Xiao et al. 2023) for int8 activations: move activation outliers into the weights.

:class:`~.kernels.Int8Linear` quantizes each input row with one scale (``max |x_row| / 127``). In a transformer a few
input channels (hidden dims after LayerNorm) are 10-100x larger than the rest, so that one scale is too coarse for
every other channel. Smoothing divides input channel ``j`` by ``s_j`` and multiplies column ``j`` of the consuming
weight by ``s_j`` -- the float function is unchanged -- with

    ``s_j = max|x_j| ^ alpha / max|W[:, j]| ^ (1 - alpha)``   (``alpha = 0.5``: the difficulty split evenly)

over calibration data. The division is *folded* into the module that produced the input, at no run-time cost:

- a ``LayerNorm`` (its ``weight`` and ``bias`` divided by ``s``), or
- a ``Linear`` (its output rows and bias divided by ``s``),

found by identity: a Linear whose input tensor *is* that module's output tensor in a probe forward (q / k / v reading
the LayerNorm output). All Linears reading the same tensor share one ``s`` (their column maxima combined). Hooks
cannot see every reader of a tensor (a residual ``x + f(x)`` reads a post-LayerNorm output too, as in BERT), so
each fold is **verified**: the model's output on a calibration batch must be unchanged, or the fold is undone.

- :func:`smooth`: the verified folds only; the float model computes the same function afterwards.
- :func:`smooth_int8`: :func:`smooth`, then every selected Linear becomes an :class:`~.kernels.Int8Linear` (8-bit
  per-channel weights); the Linears whose scale could not be folded become a :class:`SmoothedInt8Linear`, which
  multiplies its input by ``1 / s`` (one elementwise product per call) before the int8 path.

Pure PyTorch (no Lightning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.modules import optional_tensor, weight_of
from lightning_compress.core.selection import select_modules
from lightning_compress.core.validation import check_bool, check_number
from lightning_compress.quantization.calibration import feed, run_with_hooks, take_batches, to_device
from lightning_compress.quantization.kernels import Int8Linear
from lightning_compress.quantization.primitives import QuantSpec, quantize_tensor

ALPHA = 0.5
_FOLDABLE = (nn.LayerNorm, nn.Linear)


@dataclass
class SmoothingResult:
    scales: dict[str, Tensor] = field(default_factory=dict)  # producer name -> s (its output divided by s)
    consumers: dict[str, list[str]] = field(default_factory=dict)  # producer name -> Linears whose columns got * s
    skipped: dict[str, str] = field(default_factory=dict)  # Linear name -> why no scale was folded for it
    runtime: dict[str, Tensor] = field(default_factory=dict)  # smooth_int8: Linear name -> s applied at run time

    def smoothed(self) -> list[str]:
        return [name for names in self.consumers.values() for name in names]


def smoothing_scale(act_max: Tensor, weight_max: Tensor, alpha: float = ALPHA) -> Tensor:
    """``act_max^alpha / weight_max^(1 - alpha)`` per input channel; 1 where either is zero (nothing to balance)."""
    act, wmax = act_max.float(), weight_max.float()
    scale = act.pow(alpha) / wmax.pow(1.0 - alpha)
    ok = (act > 0) & (wmax > 0) & torch.isfinite(scale)
    return torch.where(ok, scale, torch.ones_like(scale)).clamp(min=1e-5)


class SmoothedInt8Linear(Int8Linear):
    """An :class:`~.kernels.Int8Linear` of ``W diag(s)`` whose input is multiplied by ``1 / s`` first."""

    inv_input_scale: Tensor  # a buffer, registered in __init__

    def __init__(self, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor) -> None:
        super().__init__(qweight, weight_scale, bias)
        if input_scale.numel() != self.in_features:
            raise ValueError(f"`input_scale` must hold {self.in_features} values, got {input_scale.numel()}")
        self.register_buffer("inv_input_scale", input_scale.detach().float().reciprocal().reshape(-1).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x * self.inv_input_scale.to(x.dtype))


def smooth(
    model: nn.Module,
    calibration_data: Iterable[Any],
    *,
    alpha: float = ALPHA,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    calibration_batches: int = 8,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> SmoothingResult:
    """Fold smoothing scales for the selected ``nn.Linear`` layers into their producers, in place, where the model's
    output stays the same (checked). ``calibration_data``, ``forward``, ``calibration_batches``: as in
    :func:`~.functional.quantize` (dict batches are fed as ``model(**batch)`` by default)."""
    result, _ = _smooth(model, calibration_data, alpha=alpha, forward=forward, calibration_batches=calibration_batches,
                        include=include, exclude=exclude)
    return result


def smooth_int8(
    model: nn.Module, calibration_data: Iterable[Any], *, runtime_scales: bool = True, **options: Any
) -> SmoothingResult:
    """:func:`smooth` (``options``: its keyword arguments), then swap every selected ``nn.Linear`` for an int8
    layer (weights 8-bit symmetric per channel, from the float weights): :class:`SmoothedInt8Linear` where no scale
    was folded (``runtime_scales``; else a plain :class:`~.kernels.Int8Linear`). Returns what was folded, what is
    scaled at run time, and why."""
    check_bool("runtime_scales", runtime_scales)
    result, (linears, act_max) = _smooth(model, calibration_data, **options)
    alpha = options.get("alpha", ALPHA)
    spec = QuantSpec(bits=8)
    done = set(result.smoothed())
    with torch.no_grad():
        for name, linear in linears.items():
            if runtime_scales and name not in done and name in act_max:
                scale = smoothing_scale(act_max[name], linear.weight.abs().amax(dim=0), alpha)
                qt = quantize_tensor(linear.weight * scale.to(linear.weight.dtype), spec)
                new: nn.Module = SmoothedInt8Linear(qt.q, qt.row_scale(), linear.bias, scale)
                result.runtime[name] = scale.cpu()
            else:
                new = Int8Linear.from_quantized(linear, quantize_tensor(linear.weight, spec))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new.to(linear.weight.device))
    return result


_Found = tuple[dict[str, nn.Linear], dict[str, Tensor]]  # the linears seen, and their inputs' per-channel maxima


def _smooth(model: nn.Module, calibration_data: Iterable[Any], alpha: float = ALPHA,
            forward: Callable[[nn.Module, Any], Any] | None = None, calibration_batches: int = 8,
            include: Sequence[str] | None = None,
            exclude: Sequence[str] | None = None) -> tuple[SmoothingResult, _Found]:
    check_number("alpha", alpha, low=0.0, high=1.0)
    check_number("calibration_batches", calibration_batches, low=1, integer=True)
    run = forward or feed
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = [to_device(b, device) for b in take_batches(calibration_data, calibration_batches)]
    linears = {n: m for n, m in select_modules(model, ["Linear"], include, exclude).items() if type(m) is nn.Linear}
    if not linears or any(n == "" for n in linears):
        raise ValueError("`smooth` needs a model with nn.Linear submodules (not a bare Linear) selected by "
                         f"`include`={include!r}, `exclude`={exclude!r}")
    producers = {n: m for n, m in model.named_modules() if isinstance(m, _FOLDABLE)}
    training = model.training
    model.eval()
    try:
        sources, skipped = _find_producers(model, linears, producers, batches[0], run)
        act_max = _input_absmax(model, linears, batches, run)
        with torch.no_grad():
            reference = run(model, batches[0])
        result = SmoothingResult(skipped=skipped)
        groups: dict[str, list[str]] = {}
        for name, producer in sources.items():
            groups.setdefault(producer, []).append(name)
        for producer, consumers in groups.items():
            amax = torch.stack([act_max[c] for c in consumers]).amax(dim=0)
            wmax = torch.stack([linears[c].weight.abs().amax(dim=0) for c in consumers]).amax(dim=0)
            scale = smoothing_scale(amax, wmax, alpha)
            touched = [producers[producer], *(linears[c] for c in consumers)]
            saved = [{k: v.detach().clone() for k, v in m.named_parameters(recurse=False)} for m in touched]
            with torch.no_grad():
                _fold(producers[producer], scale)
                for c in consumers:
                    linears[c].weight.mul_(scale.to(linears[c].weight.dtype))
                same = _close(run(model, batches[0]), reference)
                if not same:
                    for module, params in zip(touched, saved):
                        for key, value in params.items():
                            getattr(module, key).copy_(value)
            if same:
                result.scales[producer] = scale.cpu()
                result.consumers[producer] = consumers
            else:
                for c in consumers:
                    skipped[c] = (f"folding into {producer!r} changed the model's output "
                                  "(another reader, e.g. a residual)")
    finally:
        model.train(training)
    return result, (linears, act_max)


def _close(a: Any, b: Any) -> bool:
    """Every tensor in ``a`` matches ``b`` (same nesting) within float rounding of a folded rescaling."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or not a.is_floating_point():
            return a.shape == b.shape and bool(torch.equal(a, b))
        tol = 1e-3 * float(b.abs().max()) + 1e-5 if b.numel() else 0.0
        return bool(((a - b).abs() <= tol).all())
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return True


def _fold(producer: nn.Module, scale: Tensor) -> None:
    """Divide ``producer``'s output channels by ``scale``."""
    if isinstance(producer, nn.LayerNorm):
        producer.weight.div_(scale.to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias.div_(scale.to(producer.bias.dtype))
        return
    weight, bias = weight_of(producer), optional_tensor(producer, "bias")
    weight.div_(scale.to(weight.dtype).unsqueeze(1))  # Linear: output rows
    if bias is not None:
        bias.div_(scale.to(bias.dtype))


def _find_producers(
    model: nn.Module,
    linears: Mapping[str, nn.Module],
    producers: Mapping[str, nn.Module],
    batch: Any,
    run: Callable[[nn.Module, Any], Any],
) -> tuple[dict[str, str], dict[str, str]]:
    """Linear name -> the LayerNorm / Linear whose output tensor is its input (one probe forward); and why not."""
    outputs: dict[int, str] = {}
    inputs: dict[str, int] = {}
    alive: list[Tensor] = []

    def on_output(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor):
                alive.append(output)
                outputs.setdefault(id(output), name)
        return hook

    def on_input(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor) and name not in inputs:
                alive.append(args[0])
                inputs[name] = id(args[0])
        return hook

    handles = [m.register_forward_hook(on_output(n)) for n, m in producers.items()]
    run_with_hooks(model, batch, run, handles + [m.register_forward_pre_hook(on_input(n)) for n, m in linears.items()])
    found, skipped = {}, {}
    for name, module in linears.items():
        source = outputs.get(inputs[name]) if name in inputs else None
        if name not in inputs:
            skipped[name] = "not called by the calibration forward"
        elif source is None:
            skipped[name] = "its input is not a LayerNorm / Linear output (e.g. after an activation)"
        elif isinstance(producers[source], nn.LayerNorm) and producers[source].weight is None:
            skipped[name] = f"its producer {source!r} is a LayerNorm without affine weight"
        elif weight_of(producers[source], source).shape[0] != weight_of(module, name).shape[1]:
            skipped[name] = f"its producer {source!r} does not have one output per input channel"
        else:
            found[name] = source
    return found, skipped


def _input_absmax(
    model: nn.Module, linears: Mapping[str, nn.Module], batches: Sequence[Any], run: Callable[[nn.Module, Any], Any]
) -> dict[str, Tensor]:
    """Per input channel, the largest ``|x|`` each Linear sees over the calibration batches."""
    amax: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            current = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            amax[name] = current if name not in amax else torch.maximum(amax[name], current)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return amax
