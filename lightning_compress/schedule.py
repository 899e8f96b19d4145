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

SCHEDULES = ("one_shot", "constant", "polynomial")


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
        if self.kind not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {self.kind!r}")
        if self.kind == "polynomial":
            if self.end is None:
                raise ValueError("`end_step` is required by schedule='polynomial' (the step the ramp reaches `sparsity`)")
            if not 0 <= self.initial_sparsity <= self.sparsity:
                raise ValueError(
                    f"`initial_sparsity` must be in [0, sparsity={self.sparsity}], got {self.initial_sparsity}"
                )
        if self.end is not None and self.end < self.start:
            raise ValueError(
                f"`end_step` ({self.end}) must not be before `start_step` ({self.start}): the schedule would never run"
            )
        if self.kind == "polynomial" and self.end == self.start:
            raise ValueError(f"`end_step` must be after `start_step` for a polynomial ramp, both are {self.start}")
        if self.frequency < 1:
            raise ValueError(f"`frequency` must be an integer >= 1, got {self.frequency}")
        if self.kind == "constant" and not 0 < self.amount < 1:
            raise ValueError(f"`amount` must be in (0, 1) for schedule='constant', got {self.amount}")

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

    def last_tick(self) -> int | None:
        """The tick of the final event, when it is known in advance."""
        if self.kind == "one_shot":
            return self.start
        return self.end
