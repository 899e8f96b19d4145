"""What :func:`~.functional.quantize` and the quantization callback refuse or warn about beyond each argument's own
range: arguments that would do nothing with the method chosen, a ``metric_fn`` that is not a callable or returns
something that is not a finite number, calibration data holding NaN / inf, and a metric bound that only float (or
nothing) meets. One wording for both entry points. No Lightning import.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.validation import check_choice, check_number
from lightning_compress.quantization.coverage import METHODS
from lightning_compress.quantization.fallback import FALLBACKS
from lightning_compress.quantization.hessian import gptq_supports, probe_layers

METRIC_FN_HELP = "a callable model -> a finite float"


def check_shared(
    method: str, calibration_batches: int | None, embedding_bits: int | None, fallback: str | None,
    max_metric_drop: float | None, gptq_only: Mapping[str, Any],
) -> None:
    """The arguments :func:`~.functional.quantize` and the callback share, checked one way: each one's range, then
    the GPTQ-only ones (``gptq_only``, by name) refused with ``"rtn"`` and ``fallback`` refused without a bound."""
    check_choice("method", method, METHODS)
    if calibration_batches is not None:
        check_number("calibration_batches", calibration_batches, low=1, integer=True)
    if embedding_bits is not None:
        check_number("embedding_bits", embedding_bits, low=2, high=8, integer=True)
    if fallback is not None:
        check_choice("fallback", fallback, FALLBACKS)
    refuse_unused(method, {**gptq_only, "calibration_batches": calibration_batches})
    refuse_fallback_without_bound(fallback, max_metric_drop)


def refuse_unused(method: str, given: Mapping[str, Any]) -> None:
    """Raise naming the first GPTQ-only argument given (not None) while ``method`` is ``"rtn"``: round to nearest
    reads no calibration data, so it would silently do nothing."""
    if method != "rtn":
        return
    for name, value in given.items():
        if value is not None:
            shown = type(value).__name__ if name in ("calibration_data", "forward", "progress") else repr(value)
            raise ValueError(
                f"`{name}`={shown} does nothing with `method`='rtn' (round to nearest reads no calibration data); "
                "allowed: `method`='gptq', or leave it out"
            )


def refuse_fallback_without_bound(fallback: str | None, max_metric_drop: float | None) -> None:
    """``fallback`` only acts over a ``max_metric_drop`` bound; given without one it would do nothing."""
    if fallback is not None and max_metric_drop is None:
        raise ValueError(
            f"`fallback`={fallback!r} does nothing without `max_metric_drop` (it says where layers go when the "
            "metric bound is broken); allowed: give `max_metric_drop`, or leave `fallback` out"
        )


def check_metric_fn(metric_fn: Any) -> None:
    if metric_fn is not None and not callable(metric_fn):
        raise TypeError(f"`metric_fn` must be None or {METRIC_FN_HELP}, got {metric_fn!r}")


def measure(metric_fn: Callable[[nn.Module], Any], model: nn.Module) -> float:
    """``metric_fn(model)`` as a finite float; anything else (NaN, inf, None, a string, a tensor of several values)
    raises naming ``metric_fn`` and the value: a gate judged on it would accept or refuse at random."""
    value = metric_fn(model)
    number: float | None = None
    if isinstance(value, Tensor) and value.numel() == 1:
        number = float(value.detach().reshape(()).item())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"`metric_fn` must return a finite number ({METRIC_FN_HELP}), returned {value!r}")
    return number


def refuse_unreached(layers: Sequence[str], reached: Mapping[str, int], argument: str = "`forward` on "
                     "`calibration_data`") -> None:
    """Raise when the calibration forward reached none of ``layers`` (GPTQ would silently round them all to
    nearest)."""
    if layers and not any(name in reached for name in layers):
        raise ValueError(
            f"the calibration forward ({argument}) reached none of the layers GPTQ quantizes: "
            f"{', '.join(map(repr, layers))} saw no input (they would all silently be rounded to nearest); allowed: "
            "a forward that calls these modules on the batch (default: dicts as model(**batch), tuples as "
            "model(batch[0]))"
        )


def check_finite_batches(batches: Sequence[Any], argument: str = "`calibration_data`") -> None:
    """Raise naming the first batch (by index) holding a NaN / inf in a floating tensor: its Hessian would be NaN and
    GPTQ would fail late, naming no cause (or write garbage)."""
    for index, batch in enumerate(batches):
        for tensor in _tensors(batch):
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
                raise ValueError(
                    f"{argument} batch {index} holds non-finite values ({nan} NaN, {inf} inf in a tensor shaped "
                    f"{tuple(tensor.shape)}); calibration needs finite inputs"
                )


def check_runs(model: nn.Module, batch: Any, run: Callable[[nn.Module, Any], Any], argument: str = "`calibration_data`",
               how: str = "`forward`") -> None:
    """One forward of ``batch`` (no gradients); a failure is raised again naming ``argument``, the batch's shapes
    and, when known, the last weighted layer entered and the input size it expects, instead of torch's bare
    "mat1 and mat2 shapes cannot be multiplied"."""
    entered: list[tuple[str, nn.Module, tuple[int, ...]]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            shape = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else ()
            entered.append((name, module, shape))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), Tensor) or isinstance(m, nn.MultiheadAttention)]
    try:
        with torch.no_grad():
            run(model, batch)
    except Exception as err:
        shapes = [tuple(t.shape) for t in _tensors(batch)]
        where = ""
        if entered:
            name, module, shape = entered[-1]
            expected = _expected_input(module)
            where = f"; it failed in or after layer {name!r} ({type(module).__name__}), which got an input shaped " \
                    f"{shape}" + (f" and expects {expected}" if expected else "")
        raise ValueError(
            f"{argument} batch 0 (tensors shaped {shapes}) does not run through the model with {how}{where}: "
            f"{type(err).__name__}: {err}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()


def check_calibration(model: nn.Module, layers: Mapping[str, nn.Module], batch: Any,
                      run: Callable[[nn.Module, Any], Any], argument: str, how: str) -> None:
    """A dry run of GPTQ's calibration on one batch (the caller sets eval mode): :func:`check_runs`, then refuse a
    forward that reaches none of the layers GPTQ would take."""
    check_runs(model, batch, run, argument, how)
    todo = {name: module for name, module in layers.items() if not gptq_supports(module)}
    _, calls, _ = probe_layers(model, todo, batch, run)
    refuse_unreached(list(todo), calls, how)


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters holding NaN / inf (a diverged fit: compressing it would deliver garbage)."""
    return [name for name, p in model.named_parameters() if not bool(p.detach().isfinite().all())]


def shown(names: Sequence[str], at_most: int = 8) -> str:
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def _expected_input(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"(..., {module.in_features})"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"(N, {module.in_channels}, ...)"
    if isinstance(module, nn.Embedding):
        return f"integer ids in [0, {module.num_embeddings})"
    if isinstance(module, nn.MultiheadAttention):
        return f"(..., {module.embed_dim})"
    return ""


def _tensors(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for value in batch.values() for t in _tensors(value)]
    if isinstance(batch, (tuple, list)):
        return [t for value in batch for t in _tensors(value)]
    return []


def bound_outcome(
    source: str, bound: float, drops: Sequence[float | None], bits: Mapping[str, int], float_bits: int
) -> tuple[bool, str]:
    """Whether a fallback met ``max_metric_drop`` (``drops``: the metric drop after each state tried, the last one
    kept), and, when it did not, or met it only with every layer left float (nothing quantized), the one warning
    both entry points give."""
    kept_float = [name for name, b in bits.items() if b >= float_bits]
    final = drops[-1] if drops else None
    met = final is not None and final <= bound
    if met and len(kept_float) < len(bits):
        return True, ""
    state = "every layer was left float" if len(kept_float) == len(bits) else (
        f"{len(kept_float)} of {len(bits)} layers were left float")
    known = [d for d in drops if d is not None]
    best = f"{min(known):.4g}" if known else "unknown"
    verdict = "was met only with nothing quantized" if met else "was not met"
    return met, (f"{source}: `max_metric_drop`={bound} {verdict}: the best drop reached was {best}, and {state}; "
                 "allow a larger drop, more bits or finer groups")


def warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def float_copies(layers: Mapping[str, nn.Module], weight: Callable[[str, nn.Module], Tensor]) -> dict[str, Tensor]:
    """A copy of each selected layer's float weight: the way back if anything raises mid-way."""
    return {name: weight(name, module).detach().clone() for name, module in layers.items()}


def restore(layers: Mapping[str, nn.Module], floats: Mapping[str, Tensor],
            weight: Callable[[str, nn.Module], Tensor]) -> None:
    with torch.no_grad():
        for name, module in layers.items():
            target = weight(name, module)
            target.copy_(floats[name].to(target.device))
