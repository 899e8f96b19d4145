"""When quantization-aware training starts in a fit, and whether pruning is over by then. No Lightning.

``start`` is an epoch (``int`` >= 0: QAT from the first batch of that epoch) or a fraction of the fit's optimizer
steps (``float`` in (0, 1): QAT from step ``floor(start * total)``). Both are turned into the optimizer step at
which the fake quantizers go on, so that a pruning schedule (in steps or epochs) can be compared with it before the
first training step: pruning must be over by then (its masks are bound to plain weights; QAT's are fixed once it
starts).
"""

from __future__ import annotations

import math
from typing import Any


def check_start(start: Any) -> None:
    """``start``: an int epoch >= 0, or a float fraction of the fit strictly between 0 and 1."""
    if isinstance(start, bool) or not isinstance(start, (int, float)):
        raise TypeError(f"`start` must be an epoch (int >= 0) or a fraction of the fit (float in (0, 1)), got "
                        f"{start!r}")
    if isinstance(start, int) and start < 0:
        raise ValueError(f"`start` as an epoch must be >= 0, got {start}")
    if isinstance(start, float) and not (0.0 < start < 1.0):
        raise ValueError(f"`start` as a fraction of the fit must be in (0, 1) (an int is an epoch), got {start!r}")


def start_step(start: int | float, steps_per_epoch: int, total_steps: float | None, max_epochs: int | None) -> int:
    """The optimizer step from which QAT runs; raises when the fit ends before it (QAT would never run)."""
    if isinstance(start, float):
        if total_steps is None or not math.isfinite(total_steps):
            raise ValueError(f"`start`={start} is a fraction of the fit, but this fit has no known length (set "
                             "max_epochs or max_steps), or give `start` as an epoch (int)")
        return int(start * total_steps)
    if max_epochs is not None and max_epochs >= 0 and start >= max_epochs:
        raise ValueError(f"`start`={start} is an epoch this fit never reaches (max_epochs={max_epochs}); allowed: "
                         f"0 .. {max_epochs - 1}, or a fraction of the fit (float in (0, 1))")
    step = start * steps_per_epoch
    if total_steps is not None and math.isfinite(total_steps) and step >= total_steps:
        raise ValueError(f"`start`={start} (optimizer step {step}) is past the end of this fit ({int(total_steps)} "
                         "steps); allowed: an earlier epoch, or a fraction of the fit (float in (0, 1))")
    return step


def pruning_end_step(last_tick: int | None, unit: str, steps_per_epoch: int) -> int | None:
    """The optimizer step after which a pruning schedule has no event left (None: no known end)."""
    if last_tick is None:
        return None
    return last_tick * steps_per_epoch if unit == "epoch" else last_tick


def check_pruning_before(qat_step: int, pruning_step: int | None, describe: str) -> None:
    """Refuse a pruning schedule that may still prune once QAT has started at ``qat_step``."""
    if pruning_step is None or pruning_step > qat_step:
        when = "has no end (set `end_step`)" if pruning_step is None else f"ends at optimizer step {pruning_step}"
        raise ValueError(f"QuantizationAwareTraining starts at optimizer step {qat_step} but {describe} {when}: "
                         "pruning must be over before QAT starts (pruning first, QAT in the last part of the fit); "
                         "allowed: a later `start`, or an earlier pruning `end_step`")
