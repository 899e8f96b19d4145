"""One fit's pruning, without a Trainer: the masks in force, the gradient statistics, the schedule and the
decisions so far, and one pruning event from start to verdict. No Lightning import.

The callback supplies what only a Trainer knows as plain callables: how to measure the metric, how to make every
rank take rank zero's masks, the optimizers. A test can drive :meth:`PruningRun.event` with stand-ins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_compress.core.gate import MetricGate
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.controller import PruningController
from lightning_compress.pruning.planner import plan_masks
from lightning_compress.pruning.schedule import PruningSchedule
from lightning_compress.pruning.state import MaskState
from lightning_compress.pruning.statistics import GradientStatistics
from lightning_compress.pruning.tracked import TrackedLayers
from lightning_compress.quantization.checks import non_finite_parameters, shown

_NO_GAIN = 1e-9  # a target at most this far above the current sparsity prunes nothing: no event


class FitDivergedError(RuntimeError):
    """The model was not finite (weights or validation metric) *before* a pruning event: the fit diverged on its
    own, and pruning is not to blame. Raised instead of trying the event, so nothing pruned a broken model and no
    rollback reports the event as the cause."""


def check_finite_before(model: nn.Module, step: int, metric: float | None = None) -> None:
    """Raise :class:`FitDivergedError` when a parameter of ``model`` or the ``metric`` measured before the event at
    ``step`` is NaN / inf, naming the first offending parameters."""
    bad = non_finite_parameters(model)
    if bad:
        what = f"the model's weights are not finite before the pruning event at step {step}: {shown(bad, 3)}"
    elif metric is not None and not math.isfinite(metric):
        what = f"the validation metric is not finite ({metric}) before the pruning event at step {step}"
    else:
        return
    raise FitDivergedError(f"{what}; the fit diverged before pruning (fp16 parameters with Adam(W)? a learning rate "
                           "too high?); this event pruned nothing and the fit is stopped, so no compressed model is "
                           "delivered")


class PruningRun:
    validated = False  # set by the callback while an event runs right after a validation (a deferred gate reads it)
    validated_at: int | None = None  # the tick of the fit's last validation (per-step schedules), likewise

    def __init__(
        self,
        config: PruningConfig,
        gate: MetricGate,
        reference: str,
        model: nn.Module | None = None,
        layers: TrackedLayers | None = None,
        schedule: PruningSchedule | None = None,
    ) -> None:
        self.config = config
        self.controller = PruningController(gate, reference, config.on_violation, config.patience)
        self.state = MaskState(model or nn.Module(), layers or TrackedLayers({}), config.structured)
        self.schedule = schedule
        self.stats: GradientStatistics | None = None

    @property
    def layers(self) -> TrackedLayers:
        return self.state.layers

    # ------------------------------------------------------------------ statistics
    def start_statistics(self) -> None:
        """Allocate the statistics the criterion needs (none for magnitude), on the weights' device."""
        weights = self.layers.weights()
        if self.config.tracks_gradients and weights:
            per_weight = self.config.per_weight_statistics
            self.stats = GradientStatistics(self.layers.names, [w.shape for w in weights], per_weight=per_weight,
                                            per_unit=not per_weight, device=weights[0].device,
                                            weight_every=self.config.per_weight_every)

    def collect(self, grad_scale: float = 1.0) -> None:
        """Count the gradients of one optimizer step (while an event can still follow)."""
        if self.stats is None or self.controller.finished(self.schedule):
            return
        weights = self.layers.weights()
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
        self.stats.update(grads, weights, grad_scale=grad_scale)

    # ------------------------------------------------------------------ one event
    def event(
        self,
        tick: int,
        step: int,
        evaluate: Callable[[], float | None],
        broadcast: Callable[[Any], Any] = lambda masks: masks,
        optimizers: Iterable[torch.optim.Optimizer] = (),
    ) -> dict[str, Any] | None:
        """The event at ``tick`` (call when :meth:`PruningController.due`): metric before, new masks (``broadcast``
        makes every rank take rank zero's), metric after, the gate's verdict; a refused step is rolled back bit for
        bit. Returns the history entry, or None when the target asks for nothing new."""
        controller, before_sparsity = self.controller, self.state.sparsity()
        retry = controller.retry_at is not None  # a refused step waits: the cap may be lifted now
        target = self._target(tick)
        if not self._gains(target, before_sparsity) and not (retry and controller.capped_out(before_sparsity)):
            return None
        before = evaluate()
        check_finite_before(self.state.model, step, before)  # a fit that diverged on its own is not the event's fault
        if retry and controller.recover(before):
            target = self._target(tick)
        if not self._gains(target, before_sparsity):
            return None
        new = self.plan(target)
        undo = self.state.try_masks(*broadcast(new))
        tried = self.state.sparsity()
        after = evaluate()
        decision = self.controller.conclude(
            tick=tick, step=step, metric_before=before, metric_after=after,
            weights_finite=self.layers.weights_finite(), sparsity_before=before_sparsity, sparsity_tried=tried,
            extra={"weight_sparsity": self.state.weight_sparsity()},
        )
        if decision.accepted:
            self.state.keep(optimizers)
            if self.config.restart_statistics and self.stats is not None:
                self.stats.reset()
        else:
            self.state.roll_back(undo)
        return self.controller.history[-1]

    def plan(self, target: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The masks of an event aiming at ``target`` (a subclass may give each layer its own)."""
        return plan_masks(self.config, self.state.model, self.layers, self.stats, self.state.masks,
                          self.state.unit_masks, self.state.groups, target,
                          structured_target=self.config.structured_target)

    def _target(self, tick: int) -> float | None:
        return self.controller.target(tick, self.schedule) if self.schedule is not None else None

    def _gains(self, target: float | None, current: float) -> bool:
        """Whether an event aiming at ``target`` would prune something new (thresholds: always)."""
        return self.config.sparsity is None or (target is not None and target > current + _NO_GAIN)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict() if self.stats is not None else None, **self.state.state_dict(),
                "controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stats is not None and state.get("stats") is not None:
            self.stats.load_state_dict(state["stats"])
        self.state.load_state_dict(state)
        self.controller.load_state_dict(state.get("controller", state))  # older checkpoints: flat keys
