"""Every private torch function lightning_compress relies on, in one place (``tests/core/test_compat.py`` checks
each against the installed torch). Lightning's are in :mod:`lightning_compress.integration._compat`."""

from __future__ import annotations

import torch
from torch import Tensor


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for int8 ``a`` (M, K) and ``b`` (K, N), exact in int32: ``torch._int_mm`` (private; oneDNN on x86
    CPUs, cuBLASLt on CUDA). Shape rules: M > 16 on CUDA, K and N multiples of 8."""
    return torch._int_mm(a, b)


def has_int8_matmul() -> bool:
    return hasattr(torch, "_int_mm")
