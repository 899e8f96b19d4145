"""Budget: parsing, units (decimal vs binary), fractions, and the refusals (table-driven)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from lightning_compress.adaptive.budget import Budget, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("25MB", 25_000_000), ("1.5 MiB", 1_572_864), ("100 B", 100), ("2kB", 2000), ("2KB", 2000),
    ("3KiB", 3072), ("0.5GB", 500_000_000), ("1GiB", 2**30), (".5 MB", 500_000),
])
def test_sizes_parse_decimal_and_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected
    assert Budget(size=text).size_bytes(10**12) == expected


def test_fractions_and_counts_resolve() -> None:
    assert Budget(size=0.25).size_bytes(1000) == 250
    assert Budget(size=1234).size_bytes(10) == 1234  # an int is bytes, whatever the float model weighs
    assert Budget(macs=0.5).macs_count(1001) == 500
    assert Budget(macs=777).macs_count(10) == 777
    assert Budget(size=0.5).macs_count(100) is None and Budget(macs=0.5).size_bytes(100) is None


def test_numpy_scalars_are_taken_as_the_numbers_they_stand_for() -> None:
    """Sizes computed with numpy arrive as numpy scalars (review 9, finding 10: refused before); bools stay refused."""
    budget = Budget(size=np.int64(30_000), macs=np.int64(1000), latency=np.float32(0.5),
                    latency_input=(np.int64(32), 784), threads=np.int32(2))
    assert budget == Budget(size=30_000, macs=1000, latency=0.5, latency_input=(32, 784), threads=2)
    assert type(budget.size) is int and type(budget.latency) is float and budget.size_bytes(10) == 30_000
    assert Budget(size=np.float32(0.25)).size_bytes(1000) == 250
    for bad in ({"size": np.int64(0)}, {"size": np.float32(1.5)}, {"macs": np.bool_(True)}):
        with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
            Budget(**bad)


def test_latency_combines_with_size_and_macs() -> None:
    budget = Budget(latency=0.5, size="2MB", macs=0.25)
    assert budget.latency == 0.5 and budget.size_bytes(10**9) == 2_000_000 and budget.macs_count(1000) == 250


def test_latency_budget_reads_its_input_shape_and_threads() -> None:
    budget = Budget(latency=0.5, latency_input=[32, 1, 28, 28])  # a YAML list becomes the tuple
    assert budget.latency_input == (32, 1, 28, 28) and budget.latency_threads == 1
    assert Budget(latency=0.25, threads=4).latency_threads == 4
    assert budget.size_bytes(100) is None and budget.macs_count(100) is None


BAD: list[tuple[str, dict[str, Any], type[Exception], tuple[str, ...]]] = [
    ("nothing", {}, ValueError, ("size", "macs", "latency", "none")),
    ("latency_with_bad_size", {"size": 1.5, "latency": 0.5}, ValueError, ("size", "1.5", "(0, 1)")),
    ("latency_with_bad_macs", {"macs": "1M", "latency": 0.5}, TypeError, ("macs", "'1M'")),
    ("latency_int", {"latency": 1}, TypeError, ("latency", "1", "(0, 1)")),
    ("latency_one", {"latency": 1.0}, ValueError, ("latency", "1.0", "(0, 1)")),
    ("latency_zero", {"latency": 0.0}, ValueError, ("latency", "0.0", "(0, 1)")),
    ("latency_nan", {"latency": math.nan}, ValueError, ("latency", "nan")),
    ("latency_bool", {"latency": True}, TypeError, ("latency", "True")),
    ("latency_string", {"latency": "50%"}, TypeError, ("latency", "'50%'")),
    ("latency_input_empty", {"latency": 0.5, "latency_input": ()}, ValueError, ("latency_input", "()")),
    ("latency_input_zero", {"latency": 0.5, "latency_input": (0, 3)}, ValueError, ("latency_input", "(0, 3)")),
    ("latency_input_float", {"latency": 0.5, "latency_input": (2, 1.5)}, ValueError, ("latency_input", "1.5")),
    ("latency_input_bool", {"latency": 0.5, "latency_input": (2, True)}, ValueError, ("latency_input", "True")),
    ("latency_input_string", {"latency": 0.5, "latency_input": "2x8"}, ValueError, ("latency_input", "'2x8'")),
    ("threads_zero", {"latency": 0.5, "threads": 0}, ValueError, ("threads", "0", "[1, 256]")),
    ("threads_float", {"latency": 0.5, "threads": 2.0}, ValueError, ("threads", "2.0")),
    ("threads_bool", {"latency": 0.5, "threads": True}, ValueError, ("threads", "True")),
    ("threads_without_latency", {"size": 0.5, "threads": 2}, ValueError, ("threads", "2", "latency")),
    ("input_without_latency", {"macs": 0.5, "latency_input": (1, 4)}, ValueError, ("latency_input", "(1, 4)")),
    ("size_one", {"size": 1.0}, ValueError, ("size", "1.0", "(0, 1)")),
    ("size_zero_float", {"size": 0.0}, ValueError, ("size", "0.0")),
    ("size_negative_int", {"size": -5}, ValueError, ("size", "-5")),
    ("size_zero_int", {"size": 0}, ValueError, ("size", "0")),
    ("size_bool", {"size": True}, TypeError, ("size", "True")),
    ("size_nan", {"size": math.nan}, ValueError, ("size", "nan")),
    ("size_list", {"size": [1]}, TypeError, ("size", "[1]")),
    ("size_unit_unknown", {"size": "25 mb"}, ValueError, ("size", "'25 mb'", "MiB")),
    ("size_no_unit", {"size": "25"}, ValueError, ("size", "'25'")),
    ("size_words", {"size": "small"}, ValueError, ("size", "'small'")),
    ("size_zero_bytes", {"size": "0.1 B"}, ValueError, ("size", "'0.1 B'", "1 byte")),
    ("macs_string", {"macs": "1M"}, TypeError, ("macs", "'1M'")),
    ("macs_fraction_high", {"macs": 1.5}, ValueError, ("macs", "1.5")),
    ("macs_zero", {"macs": 0}, ValueError, ("macs", "0")),
    ("macs_bool", {"macs": False}, TypeError, ("macs", "False")),
]


@pytest.mark.parametrize(("kwargs", "error", "texts"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_budgets_are_refused_naming_the_argument(kwargs: dict[str, Any], error: type[Exception],
                                                     texts: tuple[str, ...]) -> None:
    with pytest.raises(error) as info:
        Budget(**kwargs)
    for text in texts:
        assert text in str(info.value), (text, str(info.value))


def test_budget_is_frozen() -> None:
    budget = Budget(size="1MB")
    with pytest.raises(AttributeError):
        budget.size = "2MB"  # type: ignore[misc]
