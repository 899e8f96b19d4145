"""Every private torch function lightning_compress relies on, in one place (``tests/core/test_compat.py`` checks
each against the installed torch). Lightning's are in :mod:`lightning_compress.integration._compat`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for int8 ``a`` (M, K) and ``b`` (K, N), exact in int32: ``torch._int_mm`` (private; oneDNN on x86
    CPUs, cuBLASLt on CUDA). Shape rules: M > 16 on CUDA, K and N multiples of 8."""
    return torch._int_mm(a, b)


def has_int8_matmul() -> bool:
    return hasattr(torch, "_int_mm")


def foreach_norm(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """The L2 norm of each tensor, in one call for the whole list: ``torch._foreach_norm`` (private; one C++ loop
    on CPU, fused kernels on CUDA). ``dtype`` is the accumulation and result type (float32 for 16-bit inputs whose
    norm can exceed their range)."""
    return list(torch._foreach_norm(list(tensors), 2, dtype=dtype))


def foreach_copy_(destinations: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``destination.copy_(source)`` for each pair (converting the dtype), in one call: ``torch._foreach_copy_``
    (private)."""
    torch._foreach_copy_(list(destinations), list(sources))


def has_foreach() -> bool:
    return hasattr(torch, "_foreach_norm") and hasattr(torch, "_foreach_copy_")
