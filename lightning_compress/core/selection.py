"""Which modules of a model are compressed: by type and by (regex) name. Pure PyTorch, no Lightning."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightning_compress.core.validation import check_names

# The layers both callbacks compress by default: those whose weight is a matrix / kernel over input features.
DEFAULT_MODULE_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")

# Short names usable from YAML; a fully qualified class path ("torch.nn.Linear", "my_pkg.MyLayer") works too.
MODULE_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "Embedding": nn.Embedding,
}


def resolve_module_type(name: str) -> type[nn.Module]:
    """``"Linear"`` or ``"torch.nn.Linear"`` or ``"my_pkg.layers.MyLinear"`` -> the class."""
    if name in MODULE_TYPES:
        return MODULE_TYPES[name]
    module_path, _, cls_name = name.rpartition(".")
    if module_path:
        import importlib

        try:
            cls = getattr(importlib.import_module(module_path), cls_name)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    raise ValueError(
        f"`module_types` entry {name!r} is not a known module type: use one of {sorted(MODULE_TYPES)} "
        "or the full class path of an nn.Module subclass"
    )


def compile_patterns(argument: str, patterns: Sequence[str] | None) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns or []:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"`{argument}` entry {pattern!r} is not a valid regular expression: {err}") from None
    return compiled


def select_modules(
    model: nn.Module,
    module_types: Sequence[str],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """Modules of ``model`` (by qualified name, in registration order) that are an instance of one of
    ``module_types``, whose name matches one of the ``include`` regexes (all if none given) and none of the
    ``exclude`` regexes. Regexes are matched with ``re.search`` against names such as ``"encoder.layers.0.linear1"``.
    A module shared under two names is selected once, under its first name.
    """
    types = tuple(resolve_module_type(t) for t in module_types)
    include_re = compile_patterns("include", include)
    exclude_re = compile_patterns("exclude", exclude)
    selected: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, types) or id(module) in seen:
            continue
        if include_re and not any(p.search(name) for p in include_re):
            continue
        if any(p.search(name) for p in exclude_re):
            continue
        seen.add(id(module))
        selected[name] = module
    return selected


@dataclass(frozen=True)
class Selection:
    """Which modules a callback compresses: types (short names or class paths) and name regexes, validated."""

    module_types: tuple[str, ...]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_args(
        cls,
        module_types: Sequence[str] | None,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        default_types: Sequence[str],
    ) -> Selection:
        types = check_names("module_types", module_types)
        types = list(default_types) if types is None else types
        if not types:
            raise ValueError("`module_types` must name at least one module type, got []")
        for name in types:
            resolve_module_type(name)
        patterns = {}
        for argument, value in (("include", include), ("exclude", exclude)):
            patterns[argument] = tuple(check_names(argument, value) or ())
            compile_patterns(argument, patterns[argument])
        return cls(tuple(types), patterns["include"], patterns["exclude"])

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        return select_modules(model, self.module_types, self.include or None, self.exclude or None)

    def describe(self) -> str:
        return f"`module_types`={list(self.module_types)}, `include`={list(self.include)}, `exclude`={list(self.exclude)}"
