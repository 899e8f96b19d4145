"""The private torch function in ``core/_compat`` still exists and is exact."""

from __future__ import annotations

import torch

from lightning_compress.core._compat import has_int8_matmul, int8_matmul


def test_int8_matmul_is_exact_in_int32() -> None:
    assert has_int8_matmul()
    a = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    b = torch.randint(-128, 128, (64, 16), dtype=torch.int8)
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, a.int() @ b.int())
