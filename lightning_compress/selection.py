"""Which modules of a model are compressed: by type and by (regex) name. Pure PyTorch, no Lightning."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

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
