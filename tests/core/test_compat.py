"""The private torch function in ``core/_compat`` still exists and is exact."""

from __future__ import annotations

import torch

from lightning_compress.core._compat import foreach_copy_, foreach_norm, has_foreach, has_int8_matmul, int8_matmul


def test_int8_matmul_is_exact_in_int32() -> None:
    assert has_int8_matmul()
    a = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    b = torch.randint(-128, 128, (64, 16), dtype=torch.int8)
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, a.int() @ b.int())


def test_foreach_wrappers_exist_and_match_the_per_tensor_ops() -> None:
    """``core._compat``'s wrappers of the private ``torch._foreach_*`` functions the gradient statistics use."""
    assert has_foreach()
    tensors = [torch.randn(5, 3), torch.randn(7).half() * 1000, torch.zeros(2, 2)]
    norms = foreach_norm(tensors, dtype=torch.float32)
    assert [n.dtype for n in norms] == [torch.float32] * 3
    for norm, t in zip(norms, tensors, strict=True):
        torch.testing.assert_close(norm, torch.linalg.vector_norm(t.float()))
    destinations = [torch.empty(5, 3), torch.empty(7), torch.empty(2, 2)]
    foreach_copy_(destinations, tensors)
    assert all(torch.equal(d, t.float()) for d, t in zip(destinations, tensors, strict=True))


def test_foreach_norm_keeps_nan_and_inf_visible() -> None:
    """The statistics' step check relies on a NaN or inf anywhere making that tensor's norm NaN or inf."""
    bad = [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 0.0]), torch.tensor([3.0, 4.0])]
    nan, inf, five = foreach_norm(bad, dtype=torch.float32)
    assert nan.isnan() and inf.isinf() and float(five) == 5.0
