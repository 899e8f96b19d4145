"""Byte accounting: what a model, a layer or a tensor costs in float. One definition for the whole package.

"Float" means 32-bit: a layer kept in float has ``FLOAT_BITS`` storage bits per weight, and floating-point tensors
are counted at ``FLOAT_BYTES`` per element whatever their dtype in memory (a bf16 fit's model is exported in
fp32). Other tensors (``num_batches_tracked``, integer codes) count at their own element size. No Lightning import.
"""

from __future__ import annotations

from torch import Tensor, nn

FLOAT_BITS = 32
FLOAT_BYTES = FLOAT_BITS // 8


def tensor_bytes(tensor: Tensor) -> int:
    """Bytes of ``tensor`` as this package stores it: floats at fp32, others at their own size."""
    size = FLOAT_BYTES if tensor.is_floating_point() else tensor.element_size()
    return size * tensor.numel()


def state_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of every ``state_dict`` entry of ``module`` (see :func:`tensor_bytes`). A tensor reachable under two
    keys (tied weights) is counted once, under its first key."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for key, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, Tensor) and id(value) not in seen:
            seen.add(id(value))
            out[key] = tensor_bytes(value)
    return out


def bias_bytes(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return tensor_bytes(bias) if isinstance(bias, Tensor) else 0


def layer_float_bytes(module: nn.Module, weight: Tensor) -> int:
    """A compressible layer in float: its weight plus its bias."""
    return tensor_bytes(weight) + bias_bytes(module)
