"""Keeping pruned weights pruned: structured unit masks expanded to parameter masks, and masks applied in place.
Pure PyTorch: no Lightning import.

Masks are applied in place to the parameters (no ``weight_orig`` / ``weight_mask`` re-parametrisation), so the
model's ``state_dict`` keeps its original keys and shapes and loads with ``strict=True`` into a fresh instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_compress.pruning.statistics import unit_view


# ---------------------------------------------------------------------------- structured: units -> parameters
class UnitGroupLike(Protocol):
    """What :func:`expand_unit_masks` reads of a ``structure.dependency.UnitGroup`` (and ``prunable``, if present)."""

    @property
    def followers(self) -> Sequence[str]: ...

    @property
    def consumers(self) -> Sequence[Sequence[Any]]: ...  # (name, repeat[, offset])


def expand_unit_masks(
    model: nn.Module,
    unit_keep: Mapping[str, Tensor],
    groups: Mapping[str, UnitGroupLike] | None = None,
) -> dict[str, Tensor]:
    """Parameter keep-masks (by qualified parameter name) for structured unit masks.

    For each producer (Linear / Conv) the unit's weight row and bias entry; with the dependency ``groups`` of
    :func:`lightning_compress.structure.dependency.find_unit_groups`, also the unit's entries in channel-wise followers
    (BatchNorm weight and bias, so the channel's output is exactly zero) and the input columns / channels of the
    layers that consume it. Consumers are masked only where the dependency is unambiguous (``prunable``).
    """
    modules = dict(model.named_modules())
    masks: dict[str, Tensor] = {}

    def combine(param_name: str, mask: Tensor) -> None:
        masks[param_name] = masks[param_name] & mask if param_name in masks else mask

    for producer, keep in unit_keep.items():
        module = modules[producer]
        keep = keep.bool()
        combine(f"{producer}.weight", _rows(keep, module.weight))
        if getattr(module, "bias", None) is not None:
            combine(f"{producer}.bias", keep.to(module.bias.device))
        group = (groups or {}).get(producer)
        if group is None or not getattr(group, "prunable", False):
            continue
        for follower in group.followers:
            fmod = modules[follower]
            for pname in ("weight", "bias"):
                if getattr(fmod, pname, None) is not None:
                    combine(f"{follower}.{pname}", keep.to(getattr(fmod, pname).device))
        for consumer in group.consumers:
            name, repeat = consumer[0], consumer[1]
            offset = consumer[2] if len(consumer) > 2 else 0
            combine(f"{name}.weight", _columns(keep, modules[name].weight, repeat, offset))
    return masks


def _rows(keep: Tensor, weight: Tensor) -> Tensor:
    return keep.to(weight.device).view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


def _columns(keep: Tensor, weight: Tensor, repeat: int, offset: int) -> Tensor:
    """Mask over dim 1 (input features / channels) of ``weight``: columns ``offset + u*repeat ... + repeat-1`` of
    unit ``u`` follow ``keep[u]``; other columns are kept."""
    cols = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    span = keep.to(weight.device).repeat_interleave(repeat)
    cols[offset : offset + span.numel()] = span
    shape = [1, -1] + [1] * (weight.dim() - 2)
    return cols.view(shape).expand_as(weight).clone()


# ---------------------------------------------------------------------------- applying masks
class ParameterMasks:
    """Keep-masks bound to the parameters they apply to; applies them with one fused ``_foreach_mul_``."""

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor]) -> None:
        params = dict(model.named_parameters(remove_duplicate=False))
        unknown = [n for n in masks if n not in params]
        if unknown:
            raise ValueError(f"masks name parameters that the model does not have: {unknown}")
        self.names = list(masks)
        self.params = [params[n] for n in self.names]
        self.masks = [masks[n].to(p.device).bool() for n, p in zip(self.names, self.params)]
        self._factors = [m.to(p.dtype) for m, p in zip(self.masks, self.params)]

    @torch.no_grad()
    def apply(self) -> None:
        if self.params:
            torch._foreach_mul_([p.data for p in self.params], self._factors)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        pairs = [(p.grad, f) for p, f in zip(self.params, self._factors) if p.grad is not None]
        if pairs:
            grads, factors = zip(*pairs)
            torch._foreach_mul_(list(grads), [f.to(g.dtype) for g, f in zip(grads, factors)])

    @torch.no_grad()
    def apply_to_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-parameter buffers (momentum, Adam moments) at pruned positions, so that no
        stale momentum pushes a pruned weight at the next step."""
        for p, f in zip(self.params, self._factors):
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.mul_(f.to(value.dtype))

    def as_dict(self) -> dict[str, Tensor]:
        return {n: m.detach().cpu().clone() for n, m in zip(self.names, self.masks)}


def unit_masks_to_rows(weights: Sequence[Tensor], unit_keep: Sequence[Tensor]) -> list[Tensor]:
    """Weight-shaped masks from per-unit masks (each unit's whole row)."""
    return [_rows(k, w) for k, w in zip(unit_keep, weights)]


def unit_keep_from_weights(weights: Sequence[Tensor]) -> list[Tensor]:
    """A unit is alive while any of its weights is non-zero."""
    return [unit_view(w.detach()).ne(0).any(dim=1) for w in weights]
