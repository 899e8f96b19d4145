"""When QAT starts, and pruning over by then: refusals name the argument and the value."""

from __future__ import annotations

import pytest

from lightning_compress.qat.schedule import check_pruning_before, check_start, pruning_end_step, start_step


@pytest.mark.parametrize(
    ("start", "error", "match"),
    [
        (True, TypeError, "`start` must be an epoch"),
        ("3", TypeError, "`start` must be an epoch"),
        (None, TypeError, "got None"),
        (-1, ValueError, "must be >= 0, got -1"),
        (0.0, ValueError, r"in \(0, 1\).*got 0.0"),
        (1.0, ValueError, r"in \(0, 1\).*got 1.0"),
        (1.5, ValueError, "got 1.5"),
        (float("nan"), ValueError, "got nan"),
    ],
)
def test_bad_start_is_refused(start, error, match) -> None:
    with pytest.raises(error, match=match):
        check_start(start)


def test_start_step() -> None:
    assert start_step(2, 20, 100.0, 5) == 40
    assert start_step(0.75, 20, 100.0, 5) == 75
    with pytest.raises(ValueError, match="never reaches"):
        start_step(5, 20, 100.0, 5)
    with pytest.raises(ValueError, match="past the end"):
        start_step(6, 20, 100.0, None)
    with pytest.raises(ValueError, match="no known length"):
        start_step(0.5, 20, float("inf"), None)


def test_pruning_must_be_over_when_qat_starts() -> None:
    assert pruning_end_step(3, "epoch", 20) == 60
    assert pruning_end_step(45, "step", 20) == 45
    check_pruning_before(60, 60, "pruning")
    with pytest.raises(ValueError, match="ends at optimizer step 61"):
        check_pruning_before(60, 61, "pruning")
    with pytest.raises(ValueError, match="has no end"):
        check_pruning_before(60, None, "pruning")
