"""Which modules of a model are compressed: by type and by (regex) name. Pure PyTorch, no Lightning.

Matching rule for every name pattern (``include``, ``exclude``, ``bits_overrides``): :data:`MATCH_RULE`, i.e.
``re.search`` on the module's qualified name, so a pattern matches anywhere in the name: ``"net.1"`` selects
``net.1`` and also ``net.11`` and ``net.1.conv`` (and ``.`` is any character). Anchor and escape it to name one
module: ``"^net\\.1$"``. :func:`check_patterns_match` refuses a pattern that matches nothing, and
:func:`explain_matches` lists, for the log, the modules each pattern matched with a hint where it matched more
than the name it spells.
"""

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
    "MultiheadAttention": nn.MultiheadAttention,
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
    ``exclude`` regexes. Regexes are matched with ``re.search`` against names such as ``"encoder.layers.0.linear1"``
    (:data:`MATCH_RULE`). Each argument is a list: a bare string is refused (it would be read character by character).
    A module shared under two names is selected once, under its first name.
    """
    types = tuple(resolve_module_type(t) for t in check_names("module_types", module_types, allow_none=False) or ())
    include_re = compile_patterns("include", check_names("include", include))
    exclude_re = compile_patterns("exclude", check_names("exclude", exclude))
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
            raise ValueError("`module_types` must be a non-empty list of type names, got []")
        for name in types:
            resolve_module_type(name)
        patterns = {}
        for argument, value in (("include", include), ("exclude", exclude)):
            patterns[argument] = tuple(check_names(argument, value) or ())
            compile_patterns(argument, patterns[argument])
        return cls(tuple(types), patterns["include"], patterns["exclude"])

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        return select_modules(model, self.module_types, self.include or None, self.exclude or None)

    def check(self, model: nn.Module) -> list[str]:
        """Refuse an ``include`` / ``exclude`` pattern that matches no module of the selected types; return the log
        lines saying what each pattern matched and which modules were selected (for ``rank_zero_info``)."""
        names = typed_module_names(model, self.module_types)
        what = f"module of the types {list(self.module_types)}"
        lines = []
        for argument, patterns in (("include", self.include), ("exclude", self.exclude)):
            lines += explain_matches(argument, check_patterns_match(argument, patterns, names, what=what))
        selected = list(self.select(model))
        return [*lines, f"selected {len(selected)} module(s): {', '.join(selected) or 'none'}"]

    def describe(self) -> str:
        return (f"`module_types`={list(self.module_types)}, `include`={list(self.include)}, "
                f"`exclude`={list(self.exclude)}")


MATCH_RULE = (
    "re.search on qualified module names: a pattern matches anywhere in the name, e.g. 'net.1' also matches 'net.11'"
)


def pattern_matches(
    patterns: Sequence[str] | None, names: Sequence[str], argument: str = "patterns"
) -> dict[str, list[str]]:
    """For each pattern, the ``names`` it matches under :data:`MATCH_RULE`, in order."""
    return {p.pattern: [n for n in names if p.search(n)] for p in compile_patterns(argument, patterns)}


def anchored(name: str) -> str:
    """The pattern that matches exactly ``name`` and nothing else."""
    return f"^{re.escape(name)}$"


def check_patterns_match(
    argument: str, patterns: Sequence[str] | None, names: Sequence[str], *, what: str = "module"
) -> dict[str, list[str]]:
    """Refuse a pattern of ``argument`` that matches none of ``names`` (it would be silently ignored); return
    :func:`pattern_matches`. ``what`` names the candidates in the message (e.g. ``"selected Linear/Conv layer"``)."""
    matches = pattern_matches(patterns, names, argument)
    for pattern, found in matches.items():
        if not found:
            shown = ", ".join(repr(n) for n in names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise ValueError(
                f"`{argument}` entry {pattern!r} matches no {what} (rule: {MATCH_RULE}); allowed: a pattern matching "
                f"one of [{shown}]" + (f", e.g. '{anchored(names[0])}' for exactly {names[0]!r}" if names else "")
            )
    return matches


def explain_matches(argument: str, matches: dict[str, list[str]]) -> list[str]:
    """One log line per pattern: what it matched and, when it matched names beyond the one it spells (``net.1`` ->
    ``net.11``), the anchored pattern that names one module."""
    lines = []
    for pattern, found in matches.items():
        line = f"`{argument}` '{pattern}' (re.search) matched {len(found)}: {', '.join(found) or 'nothing'}"
        exact = [n for n in found if n == pattern or re.fullmatch(pattern, n)]
        if len(found) > 1 and len(exact) == 1:
            line += f" -- to match only {exact[0]!r}, write '{anchored(exact[0])}'"
        lines.append(line)
    return lines


def typed_module_names(model: nn.Module, module_types: Sequence[str]) -> list[str]:
    """Qualified names of ``model``'s modules of one of ``module_types`` (each module once), in order."""
    types = tuple(resolve_module_type(t) for t in module_types)
    seen: set[int] = set()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, types) and id(module) not in seen:
            seen.add(id(module))
            names.append(name)
    return names
