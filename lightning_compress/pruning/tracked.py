"""The layers a pruning run tracks, and what pruning has removed from them. No Lightning import.

"Sparsity" has one meaning here: the fraction of the tracked weights that *pruning* removed (its masks), each
parameter counted once (two selected modules sharing one weight count it once). ``zero_fraction`` counts exact
zeros, which after quantization may include codes that rounded to zero; the report keeps the two apart.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from lightning_compress.structure.dependency import unit_weight, unit_weight_name


class TrackedLayers:
    """The selected modules, one per distinct weight tensor: a module whose weight another selected module already
    holds (tied weights, e.g. a LM head tied to its embedding) is pruned through that one (``shared`` names it)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules: dict[str, nn.Module] = {}
        self.shared: dict[str, str] = {}  # module name -> the tracked module that holds its weight
        owner: dict[int, str] = {}
        for name, module in modules.items():
            key = id(unit_weight(module))
            if key in owner:
                self.shared[name] = owner[key]
            else:
                owner[key] = name
                self.modules[name] = module

    @classmethod
    def trainable(cls, modules: Mapping[str, nn.Module]) -> TrackedLayers:
        """The modules whose unit weight (``weight``, an attention's ``in_proj_weight``) is trained."""
        kept = {}
        for name, module in modules.items():
            weight = getattr(module, "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight", None)
            if isinstance(weight, Tensor) and weight.requires_grad:
                kept[name] = module
        return cls(kept)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    def param_name(self, name: str) -> str:
        """The parameter of ``name`` whose entries the masks keep (``weight``, or an attention's ``in_proj_weight``)."""
        return f"{name}.{unit_weight_name(self.modules[name])}"

    def weights(self) -> list[Tensor]:
        return [unit_weight(module) for module in self.modules.values()]

    def num_units(self) -> dict[str, int]:
        return {name: int(unit_weight(module).shape[0]) for name, module in self.modules.items()}

    def mask_sparsity(self, masks: Mapping[str, Tensor]) -> float:
        """Fraction of the tracked weights whose keep-mask is False."""
        keys = [self.param_name(n) for n in self.modules]
        pruned = sum(int((~masks[key]).sum()) for key in keys if key in masks)
        return pruned / max(sum(w.numel() for w in self.weights()), 1)

    def layer_mask_sparsity(self, masks: Mapping[str, Tensor]) -> dict[str, float]:
        out = {}
        for name, weight in zip(self.modules, self.weights()):
            mask = masks.get(self.param_name(name))
            out[name] = 0.0 if mask is None else float((~mask).sum()) / weight.numel()
        return out

    def zero_fraction(self) -> float:
        """Fraction of exactly-zero elements over the tracked weights."""
        weights = self.weights()
        zeros = sum(int(w.eq(0).sum()) for w in weights)
        return zeros / max(sum(w.numel() for w in weights), 1)

    def weights_finite(self) -> bool:
        return all(bool(w.detach().isfinite().all()) for w in self.weights())
