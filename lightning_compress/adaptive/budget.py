"""``Budget(size=..., macs=...)``: what the compressed model may cost, checked when it is made. No Lightning import.

- ``size``: bytes of the file ``save_quantized`` writes. An ``int`` is bytes; a string is a number and a unit,
  where decimal units are decimal and binary units are binary, as the SI / IEC prefixes say: ``"25MB"`` is
  25 * 10**6 bytes, ``"1.5 MiB"`` is 1.5 * 2**20 (``B``, ``kB``/``KB``, ``MB``, ``GB``, ``KiB``, ``MiB``,
  ``GiB``; case of the ``B`` matters nowhere else: ``"25mb"`` is refused, since ``mb`` reads as millibits). A float
  in (0, 1) is a fraction of the fp32 model's tensor bytes (every ``state_dict`` entry at 4 bytes per float, the
  tied ones once: :func:`lightning_compress.core.accounting.state_bytes`).
- ``macs``: multiply-accumulates per example of the compressible layers (their weights' nonzero entries times the
  positions they are applied at, i.e. what a sparse kernel would execute; dense kernels run the dense count). An
  ``int`` is an absolute count for the whole model (layers the plan cannot change included); a float in (0, 1) is a
  fraction of the dense count.

A latency budget is not implemented: ``latency=`` is refused rather than silently ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]+)\s*$")


def parse_size(value: str) -> int:
    """``"25MB"`` -> 25_000_000, ``"1.5 MiB"`` -> 1_572_864 (rounded down to whole bytes)."""
    match = _SIZE.match(value)
    if match is None or match.group(2) not in UNITS:
        raise ValueError(f"`size` must be a number followed by a unit in {list(UNITS)} (e.g. '25MB', '1.5 MiB'), "
                         f"got {value!r}")
    nbytes = math.floor(float(match.group(1)) * UNITS[match.group(2)])
    if nbytes < 1:
        raise ValueError(f"`size` must be at least 1 byte, got {value!r}")
    return nbytes


def _check_amount(name: str, value: Any, *, allow_string: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str) if allow_string else (int, float)):
        kinds = "an int (bytes), a string such as '25MB' or a float in (0, 1)" if allow_string else \
            "an int (an absolute count) or a float in (0, 1) (a fraction of the dense model)"
        raise TypeError(f"`{name}` must be {kinds}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not (0.0 < value < 1.0):
        raise ValueError(f"`{name}` as a float is a fraction of the dense model and must be in (0, 1), got {value!r}"
                         "; give an int for an absolute amount")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Budget:
    """A size and / or MACs budget; at least one. ``resolve_*`` turn fractions into absolute amounts."""

    size: int | float | str | None = None
    macs: int | float | None = None
    latency: float | None = None

    def __post_init__(self) -> None:
        if self.latency is not None:
            raise ValueError(f"`latency`={self.latency!r}: a latency budget is not implemented yet; allowed: "
                             "`size` and / or `macs`")
        if self.size is None and self.macs is None:
            raise ValueError("Budget() needs `size` (bytes, e.g. '25MB', or a fraction of the fp32 model) and / or "
                             "`macs` (a count or a fraction), got neither")
        if self.size is not None:
            _check_amount("size", self.size, allow_string=True)
            if isinstance(self.size, str):
                parse_size(self.size)
        if self.macs is not None:
            _check_amount("macs", self.macs, allow_string=False)

    def size_bytes(self, float_bytes: int) -> int | None:
        """The size budget in bytes, a fraction taken of ``float_bytes`` (rounded down)."""
        if self.size is None:
            return None
        if isinstance(self.size, str):
            return parse_size(self.size)
        if isinstance(self.size, float):
            return math.floor(self.size * float_bytes)
        return self.size

    def macs_count(self, dense_macs: int) -> int | None:
        """The MACs budget as a count, a fraction taken of ``dense_macs`` (rounded down)."""
        if self.macs is None:
            return None
        return math.floor(self.macs * dense_macs) if isinstance(self.macs, float) else self.macs
