"""Typed access to the parts of a module the package reads. ``nn.Module.__getattr__`` is typed ``Tensor | Module``;
these check what they return, so a module without the expected tensor fails with a message naming it."""

from __future__ import annotations

from torch import Tensor, nn


def weight_of(module: nn.Module, name: str = "") -> Tensor:
    """``module.weight``, which must be a tensor."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"module {name or type(module).__name__!r} ({type(module).__name__}) has no weight tensor")
    return weight


def optional_tensor(module: nn.Module, attribute: str) -> Tensor | None:
    """``module.<attribute>`` when it is a tensor (e.g. a bias that may be None), else None."""
    value = getattr(module, attribute, None)
    return value if isinstance(value, Tensor) else None
