"""Argument checks shared by the callbacks and the functional APIs.

Every check raises a ``ValueError`` (or ``TypeError``) whose message names the argument, the value received and
what is allowed, so that a bad YAML line is found before the first training step. No ``assert``: ``python -O``
strips those.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def check_choice(name: str, value: Any, allowed: Collection[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {sorted(map(str, allowed))}, got {value!r}")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> None:
    """Refuse anything that is not a (real, finite) number in the interval given."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise TypeError(f"`{name}` must be {kind}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):  # ints are finite (and may exceed a float)
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"`{name}` must be {kind} in {interval}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Refuse anything but ``True`` / ``False`` (YAML's ``no`` arrives as False, but a Python ``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__})")


def check_names(name: str, value: Any, *, allow_none: bool = True) -> list[str] | None:
    """A list of strings (regexes, type names). A bare string is refused: iterating it would read it character by
    character (``"net.5"`` would become the patterns ``n``, ``e``, ``t``, ``.``, ``5`` and select everything)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        raise TypeError(f"`{name}` must be a list of strings, got the string {value!r}; write [{value!r}]")
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"`{name}` must be a list of strings, got {value!r}")
    return list(value)
