"""Trained uint8 activation ranges as plain values: what ``compressed.ckpt`` and the quantized safetensors export
store of QAT's input ranges (``activations="int8"``), and their checked reading. No Lightning.

A range is ``(scale, zero point)`` of a quantized layer's input, keyed by the layer's weight ``state_dict`` key (as
the codes are, :mod:`lightning_compress.quantization.carried`); ``export_onnx(activations="static")`` writes them
instead of calibrating. Both files are untrusted on reading: every range must belong to a quantized weight of the
file, with a finite positive scale and an integer zero point in 0..255 (:func:`from_entry`).

In the safetensors export the ranges are one metadata field, ``"activations"``: ``{"version": 1, "ranges": {key:
[scale, zero_point]}}`` (:func:`metadata_entry`). Its own version, not the file's: a reader that predates it
ignores the field and loads the codes (what it did before), and this reader refuses a version it does not know
(:func:`read_metadata_entry`) instead of guessing.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from lightning_compress.core.io import UntrustedFileError

Range = tuple[float, int]  # (scale, uint8 zero point)
QMIN, QMAX = 0, 255  # uint8, what ORT's static kernels read
METADATA_FIELD = "activations"  # the export's metadata field
ENTRY_VERSION = 1  # the newest version of that field this reads and writes


def _finite_positive(value: int | float) -> bool:
    """Whether ``value`` is a finite float > 0; an integer too large for a float (a crafted file's ``10**400``:
    ``float()`` raises OverflowError, which is not a ValueError) is not."""
    try:
        as_float = float(value)
    except OverflowError:
        return False
    return math.isfinite(as_float) and as_float > 0


def check_range(scale: Any, zero_point: Any, where: str) -> None:
    """A finite positive float scale and an integer zero point in 0..255, else ValueError naming ``where``."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not _finite_positive(scale):
        raise ValueError(f"{where}: the scale must be a finite number > 0, got {scale!r:.80}")
    if isinstance(zero_point, bool) or not isinstance(zero_point, int) or not QMIN <= zero_point <= QMAX:
        raise ValueError(f"{where}: the zero point must be an integer in {QMIN}..{QMAX}, got {zero_point!r}")


def to_entry(ranges: Mapping[str, Range]) -> dict[str, list[float | int]]:
    """Ranges as plain values (JSON, a checkpoint entry): ``{key: [scale, zero_point]}``."""
    return {key: [float(scale), int(zero_point)] for key, (scale, zero_point) in ranges.items()}


def from_entry(value: Any, keys: Collection[str], source: str) -> dict[str, Range]:
    """The ranges an entry holds (:func:`to_entry`), each checked: a key among the quantized ``keys``, a finite
    positive scale, an integer zero point in 0..255; anything else raises
    :class:`~lightning_compress.core.io.UntrustedFileError` naming ``source``. None: no ranges."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UntrustedFileError(f"{source}: activation ranges must be a dict, got {type(value).__name__}")
    found = {}
    for key, pair in value.items():
        if key not in keys:
            raise UntrustedFileError(f"{source}: an activation range for {key!r:.100}, which is not a quantized weight")
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise UntrustedFileError(f"{source}: the activation range of {key!r} must be [scale, zero_point], got "
                                     f"{pair!r:.80}")
        try:
            check_range(pair[0], pair[1], f"{source}: activation range of {key!r}")
        except ValueError as err:
            raise UntrustedFileError(str(err)) from None
        found[key] = (float(pair[0]), int(pair[1]))
    return found


def metadata_entry(ranges: Mapping[str, Range]) -> dict[str, Any]:
    """The export's ``"activations"`` metadata field for ``ranges``."""
    return {"version": ENTRY_VERSION, "ranges": to_entry(ranges)}


def read_metadata_entry(name: str, meta: Mapping[str, Any], keys: Collection[str]) -> dict[str, Range]:
    """The ranges of an export's metadata (``name`` the file), checked; ``{}`` when it has none."""
    value = meta.get(METADATA_FIELD)
    if value is None:
        return {}
    where = f"{name!r}: metadata key {METADATA_FIELD!r}"
    if not isinstance(value, dict) or set(value) != {"version", "ranges"}:
        raise UntrustedFileError(f"{where} must be {{'version': ..., 'ranges': {{weight key: [scale, zero_point]}}}}, "
                                 f"got {value!r:.120}")
    version = value["version"]
    if type(version) is not int or not 1 <= version <= ENTRY_VERSION:
        raise UntrustedFileError(f"{where} has version {version!r:.40}; this version reads 1..{ENTRY_VERSION}")
    return from_entry(value["ranges"], keys, where)
