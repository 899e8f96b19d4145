"""When to prune and how much. Pure Python: no Lightning import.

A schedule maps a tick (the trainer's ``global_step`` after an optimizer step, or a finished epoch's index + 1
when the callback runs per epoch) to the target sparsity of a pruning event at that tick, or ``None``.

``one_shot``    one event at ``start``, straight to ``sparsity``.
``constant``    an event every ``frequency`` ticks from ``start``, each pruning ``amount`` of what is left,
                until ``sparsity`` is reached (or ``end``).
``polynomial``  Zhu & Gupta (2017): events every ``frequency`` ticks from ``start`` to ``end`` (inclusive) with
                target ``s_f + (s_i - s_f) * (1 - (t - start) / (end - start))**3``: fast early, gentle late.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_compress.core.validation import check_number

SCHEDULES = ("one_shot", "constant", "polynomial")


def check_schedule_args(
    kind: str,
    start: int | None,
    end: int | None,
    frequency: int | None,
    amount: float,
    initial_sparsity: float,
    sparsity: float | None,
) -> None:
    """The schedule's arguments, each alone and together (``None``: derived later from the fit's length). Ticks
    count from 1 (the first optimizer step, or the end of the first epoch): a schedule starting at 0 would never
    fire."""
    if kind not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {kind!r}")
    # a polynomial ramp may start at 0 (its origin: the first event is at `frequency`); one_shot and constant events
    # happen at `start` itself, and tick 0 never comes
    first = 0 if kind == "polynomial" else 1
    for name, value, low in (("start_step", start, first), ("end_step", end, 1), ("frequency", frequency, 1)):
        if value is not None:
            check_number(name, value, low=low, integer=True)
    if start is not None and end is not None:
        if end < start:
            raise ValueError(
                f"`end_step` ({end}) must not be before `start_step` ({start}): the schedule would never run"
            )
        if kind == "polynomial" and end == start:
            raise ValueError(f"`end_step` must be after `start_step` for a polynomial ramp, both are {start}")
    check_number("amount", amount, low=0, high=1, low_inclusive=False, high_inclusive=False)
    check_number("initial_sparsity", initial_sparsity, low=0, high=1, high_inclusive=False)
    if sparsity is not None and initial_sparsity > sparsity:
        raise ValueError(f"`initial_sparsity` ({initial_sparsity}) must not exceed `sparsity` ({sparsity})")


@dataclass(frozen=True)
class PruningSchedule:
    kind: str = "polynomial"
    sparsity: float = 0.8  # final target, fraction of entries pruned
    start: int = 1
    end: int | None = None  # required by "polynomial"
    frequency: int = 1
    amount: float = 0.2  # "constant": fraction of the remaining entries pruned per event
    initial_sparsity: float = 0.0  # "polynomial": s_i

    def __post_init__(self) -> None:
        if self.kind == "polynomial" and self.end is None:
            raise ValueError("`end_step` is required by schedule='polynomial' (the step the ramp reaches `sparsity`)")
        check_schedule_args(self.kind, self.start, self.end, self.frequency, self.amount, self.initial_sparsity,
                            self.sparsity)

    @classmethod
    def for_fit(
        cls,
        kind: str,
        sparsity: float,
        total: int | None,
        unit: str,
        start: int | None = None,
        end: int | None = None,
        frequency: int | None = None,
        amount: float = 0.2,
        initial_sparsity: float = 0.0,
    ) -> PruningSchedule:
        """The schedule of a fit ``total`` ticks long (None: unknown), with the defaults filled in: start at 10 %
        of the fit, a polynomial ramp ending at 70 % (the rest is left to recover), ten events."""
        if total is None and (start is None or (end is None and kind == "polynomial")):
            raise ValueError(
                "the fit's length is unknown (no max_epochs/max_steps), so give `start_step` and `end_step` explicitly"
            )
        length = total or 0
        start = start if start is not None else max(1, int(0.1 * length))
        if end is None and kind == "polynomial":
            end = max(start + 1, int(0.7 * length))
        frequency = frequency or max(1, ((end or start) - start) // 10)
        if total is not None and (start > total or (end is not None and end > total)):
            raise ValueError(
                f"the pruning schedule (start_step={start}, end_step={end}, in {unit}s) does not fit in this fit's "
                f"{total} {unit}s"
            )
        return cls(kind, sparsity, start, end, frequency, amount, initial_sparsity)

    def is_event(self, tick: int) -> bool:
        if tick < self.start or (self.end is not None and tick > self.end):
            return False
        if self.kind == "one_shot":
            return tick == self.start
        return (tick - self.start) % self.frequency == 0 or tick == self.end

    def target(self, tick: int) -> float | None:
        """Target sparsity of the event at ``tick``, or None if ``tick`` is no event."""
        if not self.is_event(tick):
            return None
        if self.kind == "one_shot":
            return self.sparsity
        if self.kind == "constant":
            events_so_far = (tick - self.start) // self.frequency + 1
            return min(self.sparsity, 1.0 - (1.0 - self.amount) ** events_so_far)
        end = self.end if self.end is not None else tick  # never None here: checked in __post_init__
        progress = min(1.0, (tick - self.start) / max(end - self.start, 1))
        return self.sparsity + (self.initial_sparsity - self.sparsity) * (1.0 - progress) ** 3

    def target_by(self, tick: int) -> float | None:
        """The target in force at ``tick``: that of the last event at or before it (None before the first), for a
        refused step retried between two events or after the last one."""
        if tick < self.start:
            return None
        if self.kind == "one_shot":
            return self.sparsity
        last = tick if self.end is None else min(tick, self.end)
        if last != self.end:
            last -= (last - self.start) % self.frequency
        return self.target(last)

    def last_tick(self) -> int | None:
        """The tick of the final event, when it is known in advance."""
        if self.kind == "one_shot":
            return self.start
        return self.end
