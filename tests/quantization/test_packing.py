"""Dense n-bit packing: hand-checked layouts, round trips at odd lengths and negative values, refusals."""

import pytest
import torch

from lightning_compress.quantization.packing import pack, packed_nbytes, unpack


def test_4bit_two_per_byte_low_nibble_first():
    packed = pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 4, signed=False)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [1 | (2 << 4), 3]  # odd length: the last high nibble is padding


def test_4bit_signed_codes_are_offset_by_8():
    packed = pack(torch.tensor([-8, 7, 0, -1], dtype=torch.int8), 4, signed=True)
    assert packed.tolist() == [0 | (15 << 4), 8 | (7 << 4)]
    assert unpack(packed, 4, 4, signed=True).tolist() == [-8, 7, 0, -1]


def test_3bit_codes_straddle_bytes_little_endian():
    # 1 -> bits 1,0,0; 2 -> 0,1,0; 3 -> 1,1,0 (least significant first); stream 100 010 110 -> bytes
    packed = pack(torch.tensor([1, 2, 3]), 3, signed=False)
    assert packed.tolist() == [0b11010001, 0b0]
    assert unpack(packed, 3, 3, signed=False).tolist() == [1, 2, 3]


def test_2bit_four_per_byte():
    assert pack(torch.tensor([3, 0, 1, 2, 1]), 2, signed=False).tolist() == [3 | (1 << 4) | (2 << 6), 1]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1001])
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip(bits, numel, signed):
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    codes = torch.randint(low, high, (numel,), dtype=torch.int16)
    packed = pack(codes, bits, signed=signed)
    assert packed.numel() == packed_nbytes(numel, bits) == -(-numel * bits // 8)
    out = unpack(packed, bits, numel, signed=signed)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out.to(torch.int16), codes)


def test_round_trip_keeps_shape_agnostic_order():
    codes = torch.randint(-8, 8, (5, 3, 7), dtype=torch.int8)
    assert torch.equal(unpack(pack(codes, 4, signed=True), 4, codes.numel(), signed=True).reshape(5, 3, 7), codes)


def test_unpack_does_not_alias_input():
    packed = torch.tensor([1, 2, 3], dtype=torch.uint8)
    out = unpack(packed, 8, 3, signed=False)
    out[0] = 99
    assert packed[0] == 1


@pytest.mark.parametrize(("codes", "signed"), [([0, 16], False), ([-1, 3], False), ([8], True), ([-9], True)])
def test_out_of_range_codes_raise(codes, signed):
    with pytest.raises(ValueError, match=r"outside the .* 4-bit range"):
        pack(torch.tensor(codes), 4, signed=signed)


def test_unpack_wrong_size_raises():
    with pytest.raises(ValueError, match=r"`packed` must hold 3 bytes \(uint8\) for 5 4-bit codes, got 2"):
        unpack(torch.zeros(2, dtype=torch.uint8), 4, 5, signed=False)


def test_bits_argument_is_checked():
    with pytest.raises(ValueError, match=r"`bits` must be an integer in \[1, 8\], got 9"):
        pack(torch.tensor([1]), 9, signed=False)
