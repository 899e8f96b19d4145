"""Checks every rank passes or fails together: under DDP a rank that raises alone leaves the others waiting in
the next collective (a barrier, a broadcast, the first gradient all-reduce) until the job is killed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import lightning.pytorch as pl

T = TypeVar("T")


def on_every_rank(trainer: pl.Trainer, check: Callable[[], T], what: str) -> T:
    """``check()`` on every rank (every rank calls this: it holds two collectives). When it raises on any rank it
    raises on all: the rank's own error where it failed, else a ``ValueError`` saying that ``what`` was refused on
    another rank, with rank zero's error when rank zero was one of them."""
    error: Exception | None = None
    value: T | None = None
    try:
        value = check()
    except Exception as err:
        error = err
    first = trainer.strategy.broadcast(f"{type(error).__name__}: {error}" if error is not None else None, src=0)
    passed = trainer.strategy.reduce_boolean_decision(error is None, all=True)
    if error is not None:
        raise error
    if not passed:
        raise ValueError(f"{what} was refused on another rank" + (f" (rank 0: {first})" if first else ""))
    return value  # type: ignore[return-value]  # check() returned on this rank
