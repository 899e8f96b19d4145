"""The masks in force during a pruning run: which weights (and units) are pruned, kept pruned through every
optimizer step, tried and rolled back exactly, saved and restored. No Lightning import."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.pruning.masks import ParameterMasks
from lightning_compress.pruning.structured import unit_families, unit_sparsity
from lightning_compress.pruning.tracked import TrackedLayers


class MaskState:
    def __init__(self, model: nn.Module, layers: TrackedLayers, structured: bool) -> None:
        self.model = model
        self.layers = layers
        self.structured = structured
        self.masks: dict[str, Tensor] = {}  # parameter name -> bool keep-mask
        self.unit_masks: dict[str, Tensor] = {}  # structured: module name -> bool keep-mask over output units
        self.groups: dict[str, Any] | None = None  # the dependency analysis's unit groups, once known
        self._params = dict(model.named_parameters(remove_duplicate=False)) if layers.modules else {}
        self._applied: ParameterMasks | None = None
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ keeping pruned weights at zero
    def bind(self) -> None:
        """(Re)bind the masks to the parameters and apply them."""
        self._applied = ParameterMasks(self.model, self.masks) if self.masks else None
        self.apply()

    def apply(self) -> None:
        if self._applied is not None:
            self._applied.apply()

    def apply_to_grads(self) -> None:
        if self._applied is not None:
            self._applied.apply_to_grads()

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Re-apply the masks after every step of these optimizers (whatever momentum or weight decay do)."""
        for optimizer in optimizers:
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.apply()))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def clear(self) -> None:
        """After compaction: the pruned entries are gone, nothing is left to mask."""
        self.masks, self.unit_masks, self._applied = {}, {}, None

    # ------------------------------------------------------------------ trying new masks
    def try_masks(self, masks: dict[str, Tensor], unit_masks: dict[str, Tensor]) -> dict[str, Any]:
        """Put new masks in force; returns what :meth:`roll_back` needs to undo it bit for bit."""
        undo = {"masks": self.masks, "unit_masks": self.unit_masks,
                "weights": {n: self._params[n].detach().clone() for n in masks}}
        self.masks, self.unit_masks = masks, unit_masks
        self.bind()
        return undo

    def keep(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """The tried masks stay: zero the optimizers' buffers (momentum, Adam moments) at the pruned positions."""
        if self._applied is not None:
            for optimizer in optimizers:
                self._applied.apply_to_optimizer_state(optimizer)

    @torch.no_grad()
    def roll_back(self, undo: dict[str, Any]) -> None:
        for name, value in undo["weights"].items():
            self._params[name].copy_(value)
        self.masks, self.unit_masks = undo["masks"], undo["unit_masks"]
        self.bind()

    # ------------------------------------------------------------------ how much is pruned
    def sparsity(self) -> float:
        """Fraction pruned: of the tracked weights, or (structured) of the prunable units, a coupled set once."""
        if self.structured:
            families = unit_families(self.layers.names, self.groups)
            return unit_sparsity(families, self.unit_masks, self.layers.num_units())
        return self.layers.mask_sparsity(self.masks)

    def weight_sparsity(self) -> float:
        """Fraction of the tracked weights that pruning removed (structured runs too), each parameter once."""
        return self.layers.mask_sparsity(self.masks)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.cpu() for n, m in self.masks.items()},
                "unit_masks": {n: m.cpu() for n, m in self.unit_masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Masks restored from a checkpoint must fit the model's parameters exactly (a mask that broadcast would
        zero a whole layer), and unit masks its tracked layers' units (checked now, not at the next event)."""
        masks = dict(state.get("masks", {}))
        for key, mask in masks.items():
            param = self._params.get(key)
            if param is None or not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(param.shape):
                shape = None if param is None else tuple(param.shape)
                raise ValueError(f"the checkpoint's pruning mask {key!r} ({getattr(mask, 'shape', type(mask))}) does "
                                 f"not fit the model's parameter ({shape}): the checkpoint belongs to another model")
        units = self.layers.num_units()
        unit_masks = dict(state.get("unit_masks", {}))
        for name, mask in unit_masks.items():
            if name not in units or not isinstance(mask, Tensor) or tuple(mask.shape) != (units[name],):
                expected = f"({units[name]},), one entry per output unit" if name in units else "no such pruned layer"
                raise ValueError(f"the checkpoint's unit mask for layer {name!r} ({getattr(mask, 'shape', type(mask))})"
                                 f" does not fit the model's (expected {expected}): the checkpoint belongs to another "
                                 "model or another selection of layers")
        self.masks = {key: mask.bool() for key, mask in masks.items()}
        self.unit_masks = {key: mask.bool() for key, mask in unit_masks.items()}
        self.bind()
