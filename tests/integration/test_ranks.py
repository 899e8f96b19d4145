"""on_every_rank: one rank's refusal is every rank's (a stub strategy plays the other ranks' side of the two
collectives; the real 2-process case is in tests/callbacks/test_adaptive.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from lightning_compress.integration.ranks import on_every_rank


class _Strategy:
    """One rank's view: ``zero`` is what rank zero broadcasts (None: this rank is rank zero), ``others_pass``
    whether every other rank's check passed."""

    def __init__(self, zero: Any = None, others_pass: bool = True) -> None:
        self.zero, self.others_pass = zero, others_pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj if self.zero is None else self.zero

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision and self.others_pass


def _trainer(**kwargs: Any) -> Any:
    return SimpleNamespace(strategy=_Strategy(**kwargs))


def _refuse() -> int:
    raise ValueError("`export_path`='x' cannot be created")


def test_a_check_every_rank_passes_returns_its_value() -> None:
    assert on_every_rank(_trainer(), lambda: 7, "x") == 7


def test_a_rank_that_fails_raises_its_own_error() -> None:
    with pytest.raises(ValueError, match="cannot be created"):
        on_every_rank(_trainer(others_pass=False), _refuse, "`export_path`='x'")


def test_a_rank_that_passes_raises_when_rank_zero_failed_quoting_it() -> None:
    trainer = _trainer(zero="ValueError: `export_path`='x' cannot be created", others_pass=False)
    with pytest.raises(ValueError, match=r"`export_path`='x' was refused on another rank \(rank 0: ValueError: "
                                         r"`export_path`='x' cannot be created\)"):
        on_every_rank(trainer, lambda: 7, "`export_path`='x'")


def test_a_rank_that_passes_raises_when_another_rank_failed() -> None:
    with pytest.raises(ValueError, match=r"^`export_path`='x' was refused on another rank$"):
        on_every_rank(_trainer(zero="", others_pass=False), lambda: 7, "`export_path`='x'")
