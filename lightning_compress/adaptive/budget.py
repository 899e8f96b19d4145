"""``Budget(size=..., macs=...)``: what the compressed model may cost, checked when it is made. No Lightning import.

- ``size``: bytes of the file the delivered model is written as (``CompressionResult.save``: ``save_quantized``,
  or ``save_float`` for a plan that keeps every layer float). An ``int`` is bytes; a string is a number and a unit,
  where decimal units are decimal and binary units are binary, as the SI / IEC prefixes say: ``"25MB"`` is
  25 * 10**6 bytes, ``"1.5 MiB"`` is 1.5 * 2**20 (``B``, ``kB``/``KB``, ``MB``, ``GB``, ``KiB``, ``MiB``,
  ``GiB``; case of the ``B`` matters nowhere else: ``"25mb"`` is refused, since ``mb`` reads as millibits). A float
  in (0, 1) is a fraction of the fp32 model's tensor bytes (every ``state_dict`` entry at 4 bytes per float, the
  tied ones once: :func:`lightning_compress.core.accounting.state_bytes`).
- ``macs``: multiply-accumulates per example of the compressible layers (their weights' nonzero entries times the
  positions they are applied at, i.e. what a sparse kernel would execute; dense kernels run the dense count). An
  ``int`` is an absolute count for the whole model (layers the plan cannot change included); a float in (0, 1) is a
  fraction of the dense count.

- ``latency``: a float in (0, 1), a fraction of the dense model's latency, both measured in ONNX Runtime on this
  machine (CPU, float graphs) at the input shape ``latency_input`` (a tuple of positive ints, e.g.
  ``(32, 1, 28, 28)``; None: the shape of the first calibration batch) with ``threads`` intra-op threads (default 1).
  ``compress()`` meets it by removing whole units (output channels / neurons, :mod:`.units`), compacting the model,
  and running layers on int8 kernels where the per-layer table measured them faster (:mod:`.latency`,
  :mod:`.latency_budget`). With ``size`` and / or ``macs`` too, every cap holds on the delivered model (its file
  measured, its MACs counted, its latency measured), in ``compress()`` and in ``AdaptiveCompression`` alike.
"""

from __future__ import annotations

import math
import numbers
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


def _plain(value: Any) -> Any:
    """A numpy (or any ``numbers``-registered) real scalar as the Python int / float it stands for; bools, Python
    numbers and anything else as they are (checked as given)."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


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
    """A size, MACs and / or latency budget. ``size_bytes`` / ``macs_count`` turn fractions into absolute
    amounts."""

    size: int | float | str | None = None
    macs: int | float | None = None
    latency: float | None = None
    latency_input: tuple[int, ...] | None = None  # the input shape latency is measured at (None: a calibration batch's)
    threads: int | None = None  # ONNX Runtime intra-op threads latency is measured with (None: 1)

    def __post_init__(self) -> None:
        for name in ("size", "macs", "latency", "threads"):  # sizes computed with numpy arrive as numpy scalars
            object.__setattr__(self, name, _plain(getattr(self, name)))
        if self.latency is None:
            for name in ("latency_input", "threads"):
                if getattr(self, name) is not None:
                    raise ValueError(f"`{name}`={getattr(self, name)!r} only applies to a latency budget; give "
                                     "`latency` (a fraction in (0, 1) of the dense model's latency) too, or leave it "
                                     "out")
        else:
            _check_latency(self)
        if self.size is None and self.macs is None and self.latency is None:
            raise ValueError("Budget() needs `size` (bytes, e.g. '25MB', or a fraction of the fp32 model), `macs` "
                             "(a count or a fraction) and / or `latency` (a fraction), got none")
        if self.size is not None:
            _check_amount("size", self.size, allow_string=True)
            if isinstance(self.size, str):
                parse_size(self.size)
        if self.macs is not None:
            _check_amount("macs", self.macs, allow_string=False)

    @property
    def latency_threads(self) -> int:
        """The intra-op threads latency is measured with."""
        return 1 if self.threads is None else self.threads

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


def _check_latency(budget: Budget) -> None:
    """``latency`` a fraction in (0, 1), ``latency_input`` a shape, ``threads`` a positive int."""
    value = budget.latency
    if isinstance(value, bool) or not isinstance(value, float):
        raise TypeError(f"`latency` must be a float in (0, 1) (a fraction of the dense model's latency), got "
                        f"{value!r} ({type(value).__name__})")
    if not (0.0 < value < 1.0):
        raise ValueError(f"`latency` is a fraction of the dense model's latency and must be in (0, 1), got {value!r}")
    shape = budget.latency_input
    if isinstance(shape, (list, tuple)):  # a YAML / JSON list; numpy ints as ints
        shape = tuple(_plain(d) for d in shape)
        object.__setattr__(budget, "latency_input", shape)
    if shape is not None and (not isinstance(shape, tuple) or not shape or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
        raise ValueError(f"`latency_input` must be the input shape as a non-empty tuple of positive ints, e.g. "
                         f"(32, 1, 28, 28), or None (the first calibration batch's shape), got {shape!r}")
    threads = budget.threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256):
        raise ValueError(f"`threads` must be an int in [1, 256] (ONNX Runtime intra-op threads), got {threads!r}")
