"""Pack n-bit integer codes (n <= 8) densely into bytes, and back. Pure PyTorch.

Layout: the codes, made unsigned (``code - qmin``, so signed symmetric codes are offset by ``2^(n-1)``), form a
little-endian bit stream: code ``i`` occupies bits ``[i*n, (i+1)*n)`` where bit ``j`` of the stream is bit
``j % 8`` of byte ``j // 8``. For 4 bits this is "two per byte, the first code in the low nibble"; for 2 bits four
per byte; for 3, 5, 6, 7 bits codes straddle bytes (8 codes in n bytes). The last byte is zero-padded, so
``numel`` must be known to unpack (the export stores it in the metadata through the weight shape).

``pack(codes, 8)`` is only the offset to unsigned; the export does not call it for 8 bits and stores the codes
as they are (signed ``int8``, directly usable by int8 kernels, or unsigned ``uint8``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_compress.core.validation import check_number


def packed_nbytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def pack(codes: Tensor, bits: int, *, signed: bool) -> Tensor:
    """``codes`` (any shape, values in the ``bits``-bit signed or unsigned range) -> 1-D ``uint8`` of
    :func:`packed_nbytes` bytes. Out-of-range codes raise instead of being silently truncated."""
    check_number("bits", bits, low=1, high=8, integer=True)
    flat = codes.reshape(-1).to(torch.int16)
    if signed:
        flat = flat + (1 << (bits - 1))
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"`codes` hold values outside the {kind} {bits}-bit range: cannot pack them in {bits} bits")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, no bit stream needed
        per_byte = 8 // bits
        pad = (-flat.numel()) % per_byte
        rows = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
        return (rows << shifts).sum(dim=1, dtype=torch.uint8)
    bit_index = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(1) >> bit_index) & 1).reshape(-1)  # (numel * bits,) of 0/1
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int, numel: int, *, signed: bool) -> Tensor:
    """Inverse of :func:`pack`: 1-D ``int8`` (signed) or ``uint8`` (unsigned) codes of length ``numel``."""
    check_number("bits", bits, low=1, high=8, integer=True)
    check_number("numel", numel, low=0, integer=True)
    if packed.dtype not in (torch.uint8, torch.int8) or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"`packed` must hold {packed_nbytes(numel, bits)} bytes (uint8) for {numel} {bits}-bit codes, "
            f"got {packed.numel()} of {packed.dtype}"
        )
    data = packed.reshape(-1).view(torch.uint8)
    if bits == 8:
        flat = data
    elif 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)
        flat = ((data.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    else:
        stream = ((data.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=data.device)) & 1).reshape(-1)
        stream = stream[: numel * bits].reshape(numel, bits)
        weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.uint8, device=data.device)
        flat = (stream * weights).sum(dim=1, dtype=torch.uint8)
    if not signed:
        return flat.clone() if bits == 8 else flat  # never alias the caller's buffer
    return (flat.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def pack_codes(codes: Tensor, bits: int, *, signed: bool) -> Tensor:
    """How the export stores codes: 8-bit codes as they are (``int8`` / ``uint8``, the caller's shape), fewer bits
    :func:`pack`\\ ed into a 1-D ``uint8`` stream."""
    return codes.contiguous() if bits == 8 else pack(codes, bits, signed=signed)


def unpack_codes(data: Tensor, bits: int, shape: tuple[int, ...], *, signed: bool) -> Tensor:
    """Inverse of :func:`pack_codes`: codes shaped ``shape``."""
    if bits == 8:
        return data.reshape(shape)
    return unpack(data, bits, math.prod(shape), signed=signed).reshape(shape)


WIDE_BITS = 32  # the widest unsigned integer :func:`pack_unsigned` stores (positions and gaps of sparse layouts)


def pack_unsigned(values: Tensor, bits: int) -> Tensor:
    """Non-negative integers below ``2^bits`` (``bits`` up to :data:`WIDE_BITS`) -> the little-endian bit stream of
    :func:`pack` (value ``i`` in bits ``[i*bits, (i+1)*bits)``), 1-D ``uint8`` of :func:`packed_nbytes` bytes."""
    check_number("bits", bits, low=1, high=WIDE_BITS, integer=True)
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"`values` hold integers outside [0, 2^{bits}): cannot pack them in {bits} bits")
    stream = torch.empty(flat.numel(), bits, dtype=torch.uint8, device=flat.device)  # one bit a byte, not int64s
    for j in range(bits):
        stream[:, j] = (flat >> j) & 1
    stream = torch.cat([stream.reshape(-1), stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_unsigned(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_unsigned`: 1-D ``int64`` of length ``numel``."""
    check_number("bits", bits, low=1, high=WIDE_BITS, integer=True)
    check_number("numel", numel, low=0, integer=True)
    if packed.dtype not in (torch.uint8, torch.int8) or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"`packed` must hold {packed_nbytes(numel, bits)} bytes (uint8) for {numel} {bits}-bit "
                         f"integers, got {packed.numel()} of {packed.dtype}")
    data = packed.reshape(-1).view(torch.uint8)
    stream = ((data.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=data.device)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    values = torch.zeros(numel, dtype=torch.int64, device=data.device)
    for j in range(bits):  # one column at a time: no (numel, bits) int64 intermediate
        values |= stream[:, j].to(torch.int64) << j
    return values
