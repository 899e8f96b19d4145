"""Sparse layouts of a quantized weight in the safetensors export: only the codes that are not the "empty" code,
and where they are. Pure PyTorch, no Lightning.

A position's *fill code* is the code that dequantizes to exactly 0 there: 0 for symmetric codes, the group's zero
point for asymmetric ones. A pruned weight holds it (zero maps to it and back, see :mod:`.primitives`), so a pruned
layer's codes are mostly fill codes, and storing them dense spends ``bits`` per pruned weight. Layouts:

- ``dense``: every code, ``<key>:qdata`` as the export has always written it; the layer's metadata has no
  ``layout`` field (a file with only dense layers is the format of version 1, readable by older versions).
- ``bitmap``: ``<key>:mask``, one bit per position (1: a code is stored), packed like 1-bit codes
  (:func:`~.packing.pack`), padding bits zero; ``<key>:qdata``, the ``kept`` stored codes in position order, packed
  at the layer's width (8 bits: a 1-D ``int8`` / ``uint8`` tensor).
- ``gaps``: ``<key>:gaps``, per stored code the number of fill codes since the previous stored one (or the start),
  each in ``gap_bits`` bits, the width of the largest gap (:func:`~.packing.pack_unsigned`); ``<key>:qdata`` as for
  ``bitmap``. Smaller than the bitmap at high sparsity (about ``kept * gap_bits`` bits against one per position).

:func:`choose` takes the smaller sparse layout where it saves more than :data:`HEADER_ALLOWANCE` bytes over dense
(the header entry and metadata fields it adds), so a sparse layout never makes a file larger; :func:`nbytes` is
what a weight is stored in, computed without writing (the adaptive planner's price), equal to what the export
writes. Reading trusts nothing: :func:`parse` checks the metadata fields and :func:`entries` gives the declared
tensors' exact dtypes and shapes (checked before any tensor is read, so nothing is allocated beyond the model's own
size, or, read without a model, beyond :data:`POSITIONS_PER_FILE_BYTE` positions per byte of the file);
:func:`decode` checks what only the data shows (the bitmap's popcount equals ``kept`` and its padding is zero, the
last gap ends inside the weight). Refusals are :class:`~lightning_compress.core.io.UntrustedFileError`
naming the file, the key and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_compress.core.io import UntrustedFileError
from lightning_compress.quantization.packing import (
    WIDE_BITS,
    pack,
    pack_codes,
    pack_unsigned,
    packed_nbytes,
    unpack,
    unpack_codes,
    unpack_unsigned,
)
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec

LAYOUTS = ("dense", "bitmap", "gaps")
# a sparse layout adds a header entry (``<key>:mask`` / ``:gaps``) and metadata fields: it is chosen only where it
# saves more tensor bytes than these take (about 100 bytes of JSON), so it never makes a file larger
HEADER_ALLOWANCE = 128
# Without a model to bound the shapes, the sparse layers of a file may together declare at most this many positions
# per byte of the file (checked by :func:`~.export_checks.check_sparse_extent`): an all-fill layer stores no codes
# and no gaps, so nothing else bounds the codes (a byte per position) and the weights decoding it allocates. A layer
# the export stores sparse with one code kept per 1000 positions spends at least 12 bits (a 10-bit gap, a 2-bit code)
# per 1000 positions, about 670 positions per byte, so files of up to about 99.9 % sparsity load without the model;
# sparser ones (fully pruned layers) need it: the model's shapes bound the file's
POSITIONS_PER_FILE_BYTE = 1024


@dataclass(frozen=True)
class Layout:
    """How one weight's codes are stored: ``kind`` (one of :data:`LAYOUTS`), ``kept`` (codes stored: every one for
    dense) and ``gap_bits`` (the width of a gap, ``gaps`` only; 0 otherwise)."""

    kind: str
    kept: int
    gap_bits: int = 0


def fill_codes(shape: tuple[int, ...], zero_point: Tensor | None) -> Tensor:
    """Per position of a weight shaped ``shape``, the code that dequantizes to exactly 0: ``int8`` zeros when
    symmetric (no ``zero_point``), else each ``(row, group)``'s zero point (``uint8``)."""
    if zero_point is None:
        return torch.zeros(shape, dtype=torch.int8)
    rows, groups = zero_point.shape  # the weight viewed as (rows, groups, group_len), as in primitives
    return zero_point.unsqueeze(-1).expand(rows, groups, math.prod(shape) // (rows * groups)).reshape(shape)


def _positions(qt: QuantizedTensor) -> Tensor:
    """Flat indices (int64, increasing) of the codes that are not the fill code."""
    zero = None if qt.zero_point is None else qt.zero_point.detach().cpu()
    return torch.nonzero((qt.q.detach().cpu() != fill_codes(qt.shape, zero)).reshape(-1)).reshape(-1)


def _gaps(positions: Tensor) -> Tensor:
    """Fill codes before each stored one since the previous (``positions`` increasing)."""
    previous = torch.cat([positions.new_full((1,), -1), positions[:-1]])
    return positions - previous - 1


def layout_nbytes(layout: Layout, numel: int, bits: int) -> int:
    """Bytes of the codes and positions a layout stores (scales and zero points excluded)."""
    if layout.kind == "dense":
        return packed_nbytes(numel, bits)
    where = packed_nbytes(numel, 1) if layout.kind == "bitmap" else packed_nbytes(layout.kept, layout.gap_bits)
    return where + packed_nbytes(layout.kept, bits)


def choose(qt: QuantizedTensor) -> Layout:
    """The layout the export writes ``qt`` in (see the module docstring)."""
    return _choose(qt)[0]


def _choose(qt: QuantizedTensor) -> tuple[Layout, Tensor]:
    numel, positions = math.prod(qt.shape), _positions(qt)
    kept = int(positions.numel())
    gap_bits = max(1, int(_gaps(positions).max()).bit_length()) if kept else 1
    dense = Layout("dense", numel)
    sparse = min((Layout("bitmap", kept), Layout("gaps", kept, gap_bits)),
                 key=lambda layout: layout_nbytes(layout, numel, qt.spec.bits))  # the first on a tie
    saved = layout_nbytes(dense, numel, qt.spec.bits) - layout_nbytes(sparse, numel, qt.spec.bits)
    return (sparse if saved > HEADER_ALLOWANCE else dense), positions


def nbytes(qt: QuantizedTensor) -> int:
    """Bytes the export stores ``qt`` in: its codes and positions under :func:`choose`, its scales and zero points."""
    codes = layout_nbytes(choose(qt), math.prod(qt.shape), qt.spec.bits)
    extra = qt.scale.numel() * qt.scale.element_size()
    if qt.zero_point is not None:
        extra += packed_nbytes(qt.zero_point.numel(), qt.spec.bits)
    return codes + extra


def encode(qt: QuantizedTensor) -> tuple[Layout, dict[str, Tensor]]:
    """The layout :func:`choose` takes and the tensors it stores, by suffix (``qdata``, ``mask``, ``gaps``)."""
    (layout, positions), q = _choose(qt), qt.q.detach().cpu()
    signed = qt.spec.symmetric
    if layout.kind == "dense":
        return layout, {"qdata": pack_codes(q, qt.spec.bits, signed=signed)}
    stored = {"qdata": pack_codes(q.reshape(-1)[positions], qt.spec.bits, signed=signed)}
    if layout.kind == "bitmap":
        mask = torch.zeros(q.numel(), dtype=torch.uint8)
        mask[positions] = 1
        stored["mask"] = pack(mask, 1, signed=False)
    else:
        stored["gaps"] = pack_unsigned(_gaps(positions), layout.gap_bits)
    return layout, stored


def describe(layout: Layout) -> dict[str, Any]:
    """The layer metadata fields of a layout (none for dense)."""
    if layout.kind == "dense":
        return {}
    fields: dict[str, Any] = {"layout": layout.kind, "kept": layout.kept}
    if layout.kind == "gaps":
        fields["gap_bits"] = layout.gap_bits
    return fields


# ---------------------------------------------------------------------------- reading
def parse(name: str, key: str, info: dict[str, Any], numel: int) -> Layout:
    """The layout a layer's metadata declares, checked: ``layout`` one of :data:`LAYOUTS`, ``kept`` an integer in
    ``[0, numel]``, ``gap_bits`` (gaps only) an integer no wider than the largest gap a weight of ``numel`` positions
    can have (so the positions' running sum cannot overflow)."""
    where = f"{name!r}, layer {key!r}"
    kind = info.get("layout", "dense")
    if kind not in LAYOUTS:
        raise UntrustedFileError(f"{where}: metadata key 'layout' must be one of {list(LAYOUTS)}, got {kind!r:.100}")
    if kind == "dense":
        extra = [field for field in ("kept", "gap_bits") if field in info]
        if extra:
            raise UntrustedFileError(f"{where}: metadata key {extra[0]!r} belongs to a sparse layout, but the layer "
                                     "is stored dense")
        return Layout("dense", numel)
    kept = info.get("kept")
    if type(kept) is not int or not 0 <= kept <= numel:
        raise UntrustedFileError(f"{where}: metadata key 'kept' must be an integer in [0, {numel}] (the weight's "
                                 f"size), got {kept!r:.100}")
    if kind == "bitmap":
        if "gap_bits" in info:
            raise UntrustedFileError(f"{where}: metadata key 'gap_bits' belongs to layout 'gaps', got layout 'bitmap'")
        return Layout("bitmap", kept)
    gap_bits = info.get("gap_bits")
    widest = min(WIDE_BITS, max(1, (numel - 1).bit_length()))  # no gap in the weight needs more bits
    if type(gap_bits) is not int or not 1 <= gap_bits <= widest:
        raise UntrustedFileError(f"{where}: metadata key 'gap_bits' must be an integer in [1, {widest}] (a gap in "
                                 f"{numel} positions), got {gap_bits!r:.100}")
    return Layout("gaps", kept, gap_bits)


Entry = tuple[set[str], tuple[int, ...]]  # the safetensors dtype codes allowed, the exact shape


def entries(layout: Layout, shape: tuple[int, ...], bits: int, symmetric: bool) -> dict[str, Entry]:
    """Per suffix, the safetensors dtype codes allowed and the exact shape the layout stores."""
    code = "I8" if symmetric else "U8"
    numel = math.prod(shape)
    if layout.kind == "dense":
        return {"qdata": ({code}, shape) if bits == 8 else ({"U8"}, (packed_nbytes(numel, bits),))}
    codes = ({code}, (layout.kept,)) if bits == 8 else ({"U8"}, (packed_nbytes(layout.kept, bits),))
    stored: dict[str, Entry] = {"qdata": codes}
    if layout.kind == "bitmap":
        stored["mask"] = ({"U8"}, (packed_nbytes(numel, 1),))
    else:
        stored["gaps"] = ({"U8"}, (packed_nbytes(layout.kept, layout.gap_bits),))
    return stored


def decode(name: str, key: str, layout: Layout, read: Callable[[str], Tensor], spec: QuantSpec,
           shape: tuple[int, ...], zero_point: Tensor | None) -> Tensor:
    """The codes of a weight shaped ``shape``, from the tensors ``read(suffix)`` returns (declared as :func:`entries`
    says, already checked); ``zero_point``: the layer's, decoded (None when symmetric)."""
    bits, signed, numel = spec.bits, spec.symmetric, math.prod(shape)
    if layout.kind == "dense":
        return unpack_codes(read("qdata"), bits, shape, signed=signed)
    where = f"{name!r}, key {key + ':' + layout.kind.replace('bitmap', 'mask')!r}"
    if layout.kind == "bitmap":
        data = read("mask")
        if numel % 8 and int(data[-1]) >> (numel % 8):
            raise UntrustedFileError(f"{where}: the bitmap's padding bits after position {numel} must be zero")
        positions = torch.nonzero(unpack(data, 1, numel, signed=False)).reshape(-1)
        if positions.numel() != layout.kept:
            raise UntrustedFileError(f"{where}: the bitmap marks {positions.numel()} positions, the metadata's "
                                     f"'kept' says {layout.kept}")
    else:
        positions = torch.cumsum(unpack_unsigned(read("gaps"), layout.gap_bits, layout.kept) + 1, 0) - 1
        if layout.kept and int(positions[-1]) >= numel:
            raise UntrustedFileError(f"{where}: the gaps reach position {int(positions[-1])}, beyond the weight's "
                                     f"{numel} positions")
    stored = unpack_codes(read("qdata"), bits, (layout.kept,), signed=signed)
    codes = fill_codes(shape, zero_point).reshape(-1).clone()
    codes[positions] = stored
    return codes.reshape(shape)
