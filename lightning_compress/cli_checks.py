"""What the CLI checks in its arguments before jsonargparse reads them, so that a mistake it would report unclearly
ends in one line naming the option (or the config file and key), the value and what is allowed:

- a ``--config`` file that is empty, holds a list or a plain value, is not YAML, or does not exist (jsonargparse:
  "Unexpected config: ");
- a class of the wrong kind, or a name that is no class, for ``--model``, ``--data`` and ``--trainer.callbacks``,
  on the command line or as ``class_path`` in a config file (jsonargparse: "Expected a path but X either not
  accessible or invalid").

Values jsonargparse reads in other ways (a nested config file, an inline YAML / JSON object, a list) are left to it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Callback

# the option -> the class it needs, and what to name as allowed
GROUPS: dict[str, tuple[type, str]] = {
    "model": (LightningModule, "MLPClassifier, SmallCNN or a class path such as my_pkg.MyModel"),
    "data": (LightningDataModule, "DigitsDataModule, MNIST5kDataModule or a class path such as my_pkg.MyData"),
    "trainer.callbacks": (Callback, "GradientStabilityPruning, PostTrainingQuantization, any Lightning callback, or "
                                    "a class path such as my_pkg.MyCallback"),
}
_CLASS_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
_FILE_SUFFIXES = (".yaml", ".yml", ".json")


class ArgumentError(ValueError):
    """An argument that cannot work, named with its value and what is allowed."""


def check_args(args: Sequence[str]) -> None:
    """Raise :class:`ArgumentError` for the first argument of ``args`` (without the program name) that cannot
    work: see the module docstring."""
    for option, value in _options(args):
        if option in ("-c", "--config"):
            _check_config_file(value)
            continue
        group = option[2:].removesuffix("+").removesuffix(".class_path")
        if group in GROUPS and _CLASS_NAME.match(value) and not value.endswith(_FILE_SUFFIXES):
            _check_class(f"`{option.removesuffix('+')}`={value!r}", value, group)


def _options(args: Sequence[str]) -> Iterator[tuple[str, str]]:
    """``(option, value)`` for ``--x=v`` and ``--x v`` forms."""
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        if "=" in arg:
            option, _, value = arg.partition("=")
            yield option, value
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            yield arg, args[i + 1]


def _check_config_file(value: str) -> None:
    shown = f"`--config`={value!r}"
    path = Path(value)
    if not path.is_file():
        raise ArgumentError(f"{shown} is not a file; allowed: a YAML file (e.g. configs/prune.yaml)")
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ArgumentError(f"{shown} is not valid YAML ({getattr(err, 'problem', None) or err}{where}); allowed: a "
                            "YAML mapping with `trainer`, `model`, `data`, ... keys") from None
    if not isinstance(config, dict):
        what = "empty" if config is None else f"a YAML {type(config).__name__} ({str(config)[:60]!r}), not a mapping"
        raise ArgumentError(f"{shown} is {what}; allowed: a YAML mapping with `trainer`, `model`, `data`, ... keys "
                            "(see configs/*.yaml, or `lightning-compress fit --print_config`)")
    for key, group, entry in _class_entries(config):
        _check_class(f"`{key}`={entry!r} in {value!r}", entry, group)


def _class_entries(config: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(key, group, class name)`` of each class a config file names for ``model``, ``data`` and
    ``trainer.callbacks``."""
    trainer = config.get("trainer")
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    entries: list[tuple[str, str, Any]] = [("model", "model", config.get("model")),
                                            ("data", "data", config.get("data"))]
    if isinstance(callbacks, list):
        entries += [(f"trainer.callbacks[{i}]", "trainer.callbacks", c) for i, c in enumerate(callbacks)]
    for key, group, entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
            key, entry = f"{key}.class_path", entry["class_path"]
        if isinstance(entry, str) and _CLASS_NAME.match(entry) and not entry.endswith(_FILE_SUFFIXES):
            yield key, group, entry


def _check_class(shown: str, name: str, group: str) -> None:
    base, allowed = GROUPS[group]
    found = _resolve(name)
    if isinstance(found, type) and issubclass(found, base):
        return
    if found is None:
        what = "names no class that can be imported"
    elif not isinstance(found, type):
        what = f"is a {type(found).__name__}, not a class"
    else:
        kind = next((b.__name__ for b in (LightningModule, LightningDataModule, Callback) if issubclass(found, b)),
                    f"class of {found.__module__}")
        what = f"is a {kind}, not a {base.__name__}"
    raise ArgumentError(f"{shown} {what}; allowed: a {base.__name__} subclass: {allowed}")


def _resolve(name: str) -> Any:
    """What ``name`` names: a dotted import path, or the class name of an imported Lightning module, datamodule or
    callback (as jsonargparse resolves short names); ``None`` when nothing."""
    if "." in name:
        module, _, attribute = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError, ValueError):
            return None
    for base in (LightningModule, LightningDataModule, Callback):
        match = next((c for c in _subclasses(base) if c.__name__ == name), None)
        if match is not None:
            return match
    return None


def _subclasses(base: type) -> Iterator[type]:
    seen: set[type] = set()
    stack: list[type] = [base]
    while stack:
        subclasses: list[type] = stack.pop().__subclasses__()
        for sub in subclasses:
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                yield sub
