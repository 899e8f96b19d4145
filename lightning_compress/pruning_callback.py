"""``GradientStabilityPruning``: prune during training from running gradient statistics.

The callback only coordinates; the math lives in pure modules:
:mod:`~lightning_compress.grad_stats` (statistics), :mod:`~lightning_compress.scoring` (criteria),
:mod:`~lightning_compress.masking` (selection and masks), :mod:`~lightning_compress.schedule` (when, how much).

Hooks:

* ``on_after_backward``: statistics of the gradient of each *optimizer step*. Under gradient accumulation,
  ``.grad`` holds the running sum of the micro-batch gradients, so the callback reads it only after the last
  micro-batch of each accumulation window (when Lightning will step), i.e. exactly the gradient the optimizer
  uses; earlier micro-batches are ignored. Under 16-bit AMP the gradients still carry the GradScaler's loss
  scale at this point: it is divided out; a step with NaN/inf gradients (one the scaler skips) is not counted.
  Under DDP the gradients are already all-reduced (averaged) when ``on_after_backward`` runs, so every rank
  accumulates identical statistics with no extra communication.
* ``on_before_optimizer_step``: gradients of pruned weights are zeroed (no momentum builds up for them).
* after every ``optimizer.step()`` (a step post-hook): masks are re-applied, so pruned weights stay exactly zero
  whatever the optimizer does (momentum, weight decay, Adam moments).
* ``on_train_batch_end`` / ``on_train_epoch_end``: pruning events of the schedule. Each event: metric before
  (once, the baseline), new masks (broadcast from rank 0), metric after; if the drop from the baseline exceeds
  ``max_metric_drop`` the step is rolled back exactly (weights and masks) and the schedule backs off or stops.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress import masking, scoring
from lightning_compress._strategy import check_strategy, destroy_gloo_group_at_exit
from lightning_compress._validation import check_choice, check_number
from lightning_compress.evaluation import DEFAULT_METRIC, MetricSpec, evaluate, has_validation_data, metric_drop
from lightning_compress.grad_stats import GradientStatistics
from lightning_compress.report import CompressionEvent, LayerRecord, finish_if_last, register, report_for
from lightning_compress.schedule import SCHEDULES, PruningSchedule
from lightning_compress.selection import compile_patterns, resolve_module_type, select_modules

log = logging.getLogger(__name__)

DEFAULT_MODULE_TYPES = ["Linear", "Conv1d", "Conv2d", "Conv3d"]
_MAX_BACKOFFS = 3


class GradientStabilityPruning(Callback):
    """Prune weights (or whole neurons / channels) whose gradients stay near zero and stable.

    Args:
        sparsity: final fraction of the tracked weights (structured: of the units) to prune, in [0, 1).
            ``None`` to prune by ``mean_threshold`` / ``std_threshold`` instead.
        criterion: ``"weighted_stability"`` (default, |w|·(|mean g| + std g)), ``"stability"`` (the article's
            |mean g| + std g), ``"magnitude"`` (|w|) or ``"taylor"`` (|w|·sqrt(E[g²])).
        structured: prune whole output units (rows of Linear, output channels of Conv) with their bias, the
            following BatchNorm entries and the consuming layer's input columns, instead of single weights.
        scope: ``"global"`` ranks all tracked layers together; ``"layer"`` prunes each layer to ``sparsity``.
        schedule: ``"polynomial"`` (Zhu & Gupta ramp), ``"constant"`` (``amount`` of the rest every
            ``frequency``) or ``"one_shot"``.
        schedule_unit: whether ``start_step`` / ``end_step`` / ``frequency`` count optimizer steps or epochs.
        start_step: first pruning event. Default: 10 % of the fit's optimizer steps (or epoch 1).
        end_step: last event of a polynomial ramp. Default: 70 % of the fit, leaving the rest to recover.
        frequency: ticks between events. Default: ``(end_step - start_step) / 10``.
        amount: fraction of the remaining weights pruned per event of the ``"constant"`` schedule.
        initial_sparsity: sparsity at the start of the polynomial ramp.
        mean_threshold / std_threshold: the article's rule: prune where |mean g| < mean_threshold and
            std g < std_threshold (both given, ``sparsity=None``); events follow the schedule's timing.
        min_keep: each layer keeps at least this fraction of its weights (units), and at least one. Default 0:
            one entry per layer. A fraction at or above ``1 - sparsity`` is refused: the floors would then take
            the whole budget (at 99 % a 1 % floor pins every layer to 1 % and the first conv to 2 weights).
        restart_statistics: after each accepted pruning event, start the gradient statistics afresh, so the next
            event ranks the surviving weights by the gradients they see in the pruned network.
        statistics: ``"per_weight"`` (mean/std of every gradient element: 4 fp32 buffers per weight),
            ``"per_unit"`` (per neuron / channel only: almost free) or ``"auto"`` (per weight for unstructured
            gradient criteria, per unit for structured ones, none for magnitude).
        module_types / include / exclude: which modules to prune (types by short name or class path; regexes on
            qualified module names).
        metric / metric_kwargs: torchmetrics metric (class path) evaluated on the validation data after each event.
        max_metric_drop: largest allowed drop of the metric from its value before pruning started, in the
            metric's units (0.01 = one accuracy point). A step that exceeds it is rolled back.
        on_violation: after a rollback, ``"backoff"`` (retry later, aiming halfway) or ``"stop"`` pruning.
        evaluate: evaluate after each event when validation data exists (a bound always evaluates).
        compact: at the end of fit, physically remove pruned units (structured only), giving a smaller dense model.
    """

    def __init__(
        self,
        sparsity: float | None = 0.8,
        criterion: Literal["weighted_stability", "stability", "magnitude", "taylor"] = "weighted_stability",
        structured: bool = False,
        scope: Literal["global", "layer"] = "global",
        schedule: Literal["polynomial", "constant", "one_shot"] = "polynomial",
        schedule_unit: Literal["step", "epoch"] = "step",
        start_step: int | None = None,
        end_step: int | None = None,
        frequency: int | None = None,
        amount: float = 0.2,
        initial_sparsity: float = 0.0,
        mean_threshold: float | None = None,
        std_threshold: float | None = None,
        min_keep: float = 0.0,
        restart_statistics: bool = False,
        statistics: Literal["auto", "per_weight", "per_unit"] = "auto",
        module_types: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        metric: str = DEFAULT_METRIC,
        metric_kwargs: dict[str, Any] | None = None,
        max_metric_drop: float | None = None,
        on_violation: Literal["backoff", "stop"] = "backoff",
        evaluate: bool = True,
        compact: bool = False,
    ) -> None:
        super().__init__()
        thresholds = (mean_threshold, std_threshold)
        if sparsity is None:
            if None in thresholds:
                raise ValueError(
                    "`sparsity` is None, so both `mean_threshold` and `std_threshold` must be given, got "
                    f"mean_threshold={mean_threshold!r}, std_threshold={std_threshold!r}"
                )
        else:
            check_number("sparsity", sparsity, low=0, high=1, high_inclusive=False)
            if thresholds != (None, None):
                raise ValueError(
                    f"give either `sparsity` (got {sparsity!r}) or `mean_threshold`/`std_threshold` (got "
                    f"{mean_threshold!r}/{std_threshold!r}), not both; set `sparsity: null` to prune by thresholds"
                )
        for name, value in (("mean_threshold", mean_threshold), ("std_threshold", std_threshold)):
            if value is not None:
                check_number(name, value, low=0)
        check_choice("criterion", criterion, scoring.CRITERIA)
        if sparsity is None and criterion not in scoring.GRADIENT_CRITERIA:
            raise ValueError(f"thresholds act on gradient statistics; `criterion` {criterion!r} tracks none")
        check_choice("structured", structured, (True, False))
        check_choice("scope", scope, ("global", "layer"))
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("schedule_unit", schedule_unit, ("step", "epoch"))
        for name, value, low in (("start_step", start_step, 0), ("end_step", end_step, 1), ("frequency", frequency, 1)):
            if value is not None:
                check_number(name, value, low=low, integer=True)
        if start_step is not None and end_step is not None and end_step < start_step:
            raise ValueError(f"`end_step` ({end_step}) must not be before `start_step` ({start_step})")
        if schedule == "polynomial" and start_step is not None and end_step is not None and end_step == start_step:
            raise ValueError(f"`end_step` must be after `start_step` for a polynomial ramp, both are {start_step}")
        if criterion in scoring.GRADIENT_CRITERIA and schedule_unit == "step" and start_step == 0:
            raise ValueError(
                f"`start_step` is 0, but criterion {criterion!r} needs gradient statistics from at least one "
                "optimizer step: use start_step >= 1"
            )
        check_number("amount", amount, low=0, high=1, low_inclusive=False, high_inclusive=False)
        check_number("initial_sparsity", initial_sparsity, low=0, high=1, high_inclusive=False)
        if sparsity is not None and initial_sparsity > sparsity:
            raise ValueError(f"`initial_sparsity` ({initial_sparsity}) must not exceed `sparsity` ({sparsity})")
        check_number("min_keep", min_keep, low=0, high=1, high_inclusive=False)
        if sparsity is not None and min_keep > 0 and min_keep >= 1 - sparsity - 1e-9:
            raise ValueError(
                f"`min_keep`={min_keep} reserves at least as many weights per layer as `sparsity`={sparsity} keeps "
                f"in total ({1 - sparsity:.4g} of them), so the floors alone would decide every mask; use a "
                f"`min_keep` below {1 - sparsity:.4g} (0 keeps one entry per layer)"
            )
        check_choice("restart_statistics", restart_statistics, (True, False))
        check_choice("statistics", statistics, ("auto", "per_weight", "per_unit"))
        if structured and statistics == "per_weight":
            raise ValueError("`statistics`='per_weight' does not apply to structured=True: units use 'per_unit'")
        self.module_types = list(DEFAULT_MODULE_TYPES if module_types is None else module_types)
        if not self.module_types:
            raise ValueError("`module_types` must name at least one module type, got []")
        for name in self.module_types:
            resolve_module_type(name)
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.metric_spec = MetricSpec(metric, metric_kwargs)
        if max_metric_drop is not None:
            check_number("max_metric_drop", max_metric_drop, low=0)
        check_choice("on_violation", on_violation, ("backoff", "stop"))
        if compact and not structured:
            raise ValueError("`compact`=True removes pruned units, so it needs structured=True")

        self.sparsity = sparsity
        self.criterion = criterion
        self.structured = structured
        self.scope = scope
        self.schedule_kind = schedule
        self.schedule_unit = schedule_unit
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.amount = amount
        self.initial_sparsity = initial_sparsity
        self.mean_threshold, self.std_threshold = mean_threshold, std_threshold
        self.min_keep = min_keep
        self.restart_statistics = restart_statistics
        self.statistics = statistics
        self.include, self.exclude = include, exclude
        self.max_metric_drop = max_metric_drop
        self.on_violation = on_violation
        self.evaluate = evaluate
        self.compact = compact

        # run state (what `state_dict` saves is marked *)
        self.schedule: PruningSchedule | None = None
        self.stats: GradientStatistics | None = None  # *
        self.masks: dict[str, Tensor] = {}  # * parameter name -> bool keep-mask
        self.unit_masks: dict[str, Tensor] = {}  # * structured: module name -> bool keep-mask over output units
        self.baseline_metric: float | None = None  # * metric before pruning started
        self.last_metric: float | None = None  # *
        self.history: list[dict[str, Any]] = []  # * one entry per event
        self._last_tick: int | None = None  # *
        self._sparsity_cap: float | None = None  # * lowered by back-offs
        self._backoffs = 0  # *
        self._stopped = False  # *
        self._pending_state: dict[str, Any] | None = None
        self._modules: dict[str, nn.Module] = {}
        self._applied: masking.ParameterMasks | None = None
        self._hooks: list[Any] = []
        self._groups: dict[str, Any] | None = None
        self._example_input: Any = None
        self._has_val = False
        self._finalized = False

    # ------------------------------------------------------------------ identity
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(criterion=self.criterion, structured=self.structured, sparsity=self.sparsity)

    @property
    def tracks_gradients(self) -> bool:
        return self.criterion in scoring.GRADIENT_CRITERIA

    @property
    def per_weight_statistics(self) -> bool:
        if not self.tracks_gradients or self.structured:
            return False
        return self.statistics in ("auto", "per_weight")

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "GradientStabilityPruning")
        destroy_gloo_group_at_exit()
        self._modules = {
            name: m
            for name, m in select_modules(pl_module, self.module_types, self.include, self.exclude).items()
            if getattr(m, "weight", None) is not None and m.weight.requires_grad
        }
        if not self._modules:
            raise ValueError(
                f"`module_types`={self.module_types}, `include`={self.include}, `exclude`={self.exclude} select "
                f"no trainable module of {type(pl_module).__name__}: nothing to prune"
            )
        self._has_val = has_validation_data(trainer, pl_module)
        if self.max_metric_drop is not None and not self._has_val:
            raise ValueError(
                f"`max_metric_drop`={self.max_metric_drop} needs validation data (a val_dataloader and a "
                "validation_step, limit_val_batches > 0) to measure the metric on"
            )
        self.schedule = self._build_schedule(trainer)
        report = register(trainer, "pruning")
        report.metric_name = self.metric_spec.name
        report.higher_is_better = self.metric_spec.higher_is_better

    def _build_schedule(self, trainer: pl.Trainer) -> PruningSchedule:
        total = trainer.max_epochs if self.schedule_unit == "epoch" else trainer.estimated_stepping_batches
        finite = total is not None and total not in (-1, float("inf"))
        if not finite and (self.start_step is None or (self.end_step is None and self.schedule_kind == "polynomial")):
            raise ValueError(
                "the fit's length is unknown (no max_epochs/max_steps), so give `start_step` and `end_step` explicitly"
            )
        total = int(total) if finite else 0
        start = self.start_step if self.start_step is not None else max(1, int(0.1 * total))
        end = self.end_step
        if end is None and self.schedule_kind == "polynomial":
            end = max(start + 1, int(0.7 * total))
        frequency = self.frequency or max(1, ((end or start) - start) // 10)
        if finite and (start > total or (end is not None and end > total)):
            raise ValueError(
                f"the pruning schedule (start_step={start}, end_step={end}, in {self.schedule_unit}s) does not fit in "
                f"this fit's {total} {self.schedule_unit}s"
            )
        return PruningSchedule(
            kind=self.schedule_kind,
            sparsity=self.sparsity if self.sparsity is not None else 1.0,
            start=start,
            end=end,
            frequency=frequency,
            amount=self.amount,
            initial_sparsity=self.initial_sparsity,
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = list(self._modules)
        weights = [self._modules[n].weight for n in names]
        if self.tracks_gradients:
            self.stats = GradientStatistics(
                names,
                [w.shape for w in weights],
                per_weight=self.per_weight_statistics,
                per_unit=not self.per_weight_statistics,
                device=weights[0].device,
            )
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        self._bind_masks(pl_module)
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self._apply_masks()))
        if self._example_input is None and getattr(pl_module, "example_input_array", None) is not None:
            self._example_input = pl_module.example_input_array

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._example_input is None and isinstance(batch, (list, tuple)) and isinstance(batch[0], Tensor):
            self._example_input = batch[0][:2].detach()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stats is None or self._done():
            return
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # not the last micro-batch: .grad is a partial sum, the optimizer will not step yet
        weights = [m.weight for m in self._modules.values()]
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
        self.stats.update(grads, weights, grad_scale=_loss_scale(trainer))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._applied is not None:
            self._applied.apply_to_grads()

    def _apply_masks(self) -> None:
        if self._applied is not None:
            self._applied.apply()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.schedule_unit == "step":
            self._maybe_prune(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule_unit == "epoch":
            self._maybe_prune(trainer, pl_module, trainer.current_epoch + 1)

    def _done(self) -> bool:
        last = self.schedule.last_tick() if self.schedule is not None else None
        return self._stopped or (last is not None and self._last_tick is not None and self._last_tick >= last)

    # ------------------------------------------------------------------ pruning events
    def _maybe_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tick: int) -> None:
        if self.schedule is None or tick == self._last_tick or self._stopped or not self.schedule.is_event(tick):
            return
        self._last_tick = tick
        self._run_pruning_step(trainer, pl_module, tick)

    def _run_pruning_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tick: int) -> None:
        if self.structured:
            self._unit_groups(pl_module)  # the unit sets (coupled layers count once), before `current_sparsity`
        target = self.schedule.target(tick) if self.schedule is not None else None
        if self.sparsity is not None:
            if target is None:
                return
            if self._sparsity_cap is not None:
                target = min(target, self._sparsity_cap)
            if target <= self.current_sparsity() + 1e-9:
                return
        evaluating = self._has_val and (self.evaluate or self.max_metric_drop is not None)
        if evaluating and self.baseline_metric is None:
            self.baseline_metric = self.last_metric = evaluate(trainer, pl_module, self.metric_spec)
            report_for(trainer).metric_before = report_for(trainer).metric_before or self.baseline_metric
        metric_before = self.last_metric
        old_masks, old_units = dict(self.masks), dict(self.unit_masks)
        new_masks, new_units = self._compute_masks(pl_module, target)
        new_masks, new_units = trainer.strategy.broadcast((new_masks, new_units), src=0)  # one decision, all ranks
        params = dict(pl_module.named_parameters())
        snapshot = {n: params[n].detach().clone() for n in new_masks}
        self.masks, self.unit_masks = new_masks, new_units
        self._bind_masks(pl_module)
        sparsity = self.current_sparsity()
        metric_after = evaluate(trainer, pl_module, self.metric_spec) if evaluating else None
        drop = metric_drop(self.baseline_metric, metric_after, self.metric_spec.higher_is_better) if evaluating else None
        accepted = self.max_metric_drop is None or drop is None or drop <= self.max_metric_drop
        note = ""
        if accepted:
            for optimizer in trainer.optimizers:
                self._applied.apply_to_optimizer_state(optimizer)  # type: ignore[union-attr]
            self.last_metric = metric_after if metric_after is not None else self.last_metric
            self._backoffs = 0
            if self.restart_statistics and self.stats is not None:
                self.stats.reset()
        else:
            with torch.no_grad():
                for name, value in snapshot.items():
                    params[name].copy_(value)
            self.masks, self.unit_masks = old_masks, old_units
            self._bind_masks(pl_module)
            note = self._back_off(sparsity)
            rank_zero_warn(
                f"GradientStabilityPruning: step {tick} to sparsity {sparsity:.3f} dropped {self.metric_spec.name} "
                f"by {drop:.4f} > max_metric_drop={self.max_metric_drop}; rolled back ({note})"
            )
            sparsity = self.current_sparsity()
        self._record(trainer, tick, metric_before, metric_after, sparsity, accepted, note)

    def _compute_masks(
        self, pl_module: pl.LightningModule, target: float | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        names = list(self._modules)
        weights = [self._modules[n].weight.detach() for n in names]
        if self.structured:
            families = self._unit_families()
            if not families:
                reasons = {n: g.reason for n, g in (self._groups or {}).items() if n in self._modules}
                raise RuntimeError(f"structured pruning: no selected layer can lose units safely: {reasons}")
            all_scores = scoring.unit_scores(self.criterion, [m.weight for m in self._modules.values()], self.stats)
            by_name = dict(zip(self._modules, all_scores))
            # a coupled set (producers summed by a residual add) shares its units: one score (the members' mean),
            # one mask for all of them, so that compaction can remove what is pruned
            scores = [torch.stack([by_name[n].float() for n in family]).mean(0) for family in families]
            current = [self._family_mask(family) for family in families]
        else:
            scores = scoring.weight_scores(self.criterion, weights, self.stats)
            current = [self.masks.get(f"{n}.weight", torch.ones_like(w, dtype=torch.bool)).to(w.device) for n, w in zip(names, weights)]
        if target is None:  # the article's thresholds
            flags = scoring.below_thresholds(self.stats, self.structured, self.mean_threshold, self.std_threshold)  # type: ignore[arg-type]
            flags_by_name = dict(zip(self._modules, flags))
            if self.structured:  # a shared unit goes when every member flags it
                flagged = [torch.stack([flags_by_name[n] for n in family]).all(0) for family in families]
            else:
                flagged = [flags_by_name[n] for n in names]
            keep = masking.threshold_masks(flagged, current, scores, self.min_keep)
        else:
            keep = masking.keep_masks(scores, current, target, scope=self.scope, min_keep=self.min_keep)
        if self.structured:
            unit_masks = {n: k.cpu() for family, k in zip(families, keep) for n in family}
            param_masks = masking.expand_unit_masks(pl_module, unit_masks, self._groups)
            return {n: m.cpu() for n, m in param_masks.items()}, unit_masks
        return {f"{n}.weight": k.cpu() for n, k in zip(names, keep)}, {}

    def _unit_families(self) -> list[list[str]]:
        """The selected layers that can lose units, as sets that share their units: a layer alone, or the
        producers a residual add couples (those of them that are selected). From the dependency groups found
        so far (each layer alone before the analysis has run)."""
        groups = self._groups or {}
        prunable = [n for n in self._modules if groups.get(n) is None or groups[n].prunable]
        families, seen = [], set()
        for name in prunable:
            if name not in seen:
                coupled = groups[name].coupled if groups.get(name) is not None else []
                family = [name] + [c for c in coupled if c in prunable and c not in seen]
                seen.update(family)
                families.append(family)
        return families

    def _family_mask(self, family: list[str]) -> Tensor:
        weight = self._modules[family[0]].weight
        keep = torch.ones(weight.shape[0], dtype=torch.bool)
        for name in family:
            if name in self.unit_masks:
                keep &= self.unit_masks[name]
        return keep.to(weight.device)

    def _unit_groups(self, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        if self._groups is None and self._example_input is not None:
            try:
                from lightning_compress.dependency import find_unit_groups

                self._groups = find_unit_groups(pl_module, self._example_input)
            except Exception as err:  # noqa: BLE001 - the analysis is best effort; masking stays correct without it
                rank_zero_warn(f"GradientStabilityPruning: dependency analysis failed ({err}); pruning rows only")
                self._groups = {}
        return self._groups

    def _back_off(self, rejected_sparsity: float) -> str:
        current = self.current_sparsity()
        self._backoffs += 1
        if self.on_violation == "stop" or self._backoffs >= _MAX_BACKOFFS:
            self._stopped = True
            return "pruning stopped"
        self._sparsity_cap = current + (rejected_sparsity - current) / 2
        if self._sparsity_cap - current < 1e-3:
            self._stopped = True
            return "pruning stopped"
        return f"backing off: sparsity capped at {self._sparsity_cap:.3f}"

    def _bind_masks(self, pl_module: pl.LightningModule) -> None:
        self._applied = masking.ParameterMasks(pl_module, self.masks) if self.masks else None
        self._apply_masks()

    # ------------------------------------------------------------------ accounting
    def _unique_weights(self) -> dict[str, Tensor]:
        seen: set[int] = set()
        out = {}
        for name, module in self._modules.items():
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                out[name] = module.weight
        return out

    def layer_sparsity(self) -> dict[str, float]:
        return {n: float((w == 0).sum()) / w.numel() for n, w in self._unique_weights().items()}

    def current_sparsity(self) -> float:
        """Fraction of pruned entries: weights (unstructured) or units (structured), each parameter counted once."""
        if self.structured:  # over the unit sets that can be pruned (all selected layers before the first event)
            layers = [f[0] for f in self._unit_families() if f[0] in self.unit_masks] or list(self._modules)
            total = sum(self._modules[n].weight.shape[0] for n in layers)
            kept = sum(int(self.unit_masks[n].sum()) if n in self.unit_masks else self._modules[n].weight.shape[0]
                       for n in layers)
            return 1.0 - kept / max(total, 1)
        weights = self._unique_weights()
        pruned = sum(int((~self.masks[f"{n}.weight"]).sum()) for n in weights if f"{n}.weight" in self.masks)
        return pruned / max(sum(w.numel() for w in weights.values()), 1)

    def weight_sparsity(self) -> float:
        """Fraction of exactly-zero elements over the tracked weights, each parameter counted once."""
        weights = list(self._unique_weights().values())
        return sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)

    def _record(
        self,
        trainer: pl.Trainer,
        tick: int,
        before: float | None,
        after: float | None,
        sparsity: float,
        accepted: bool,
        note: str,
    ) -> None:
        entry = {"tick": tick, "step": trainer.global_step, "metric_before": before, "metric_after": after,
                 "sparsity": sparsity, "weight_sparsity": self.weight_sparsity(), "accepted": accepted, "note": note}
        self.history.append(entry)
        report_for(trainer).events.append(
            CompressionEvent("prune", trainer.global_step, before, after, entry["weight_sparsity"], accepted, note)
        )
        metrics = {"pruning/sparsity": sparsity, "pruning/weight_sparsity": entry["weight_sparsity"]}
        metrics.update({f"pruning/sparsity/{n}": s for n, s in self.layer_sparsity().items()})
        if after is not None:
            metrics[f"pruning/{self.metric_spec.name}"] = after
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        shown = f", {self.metric_spec.name} {before:.4f} -> {after:.4f}" if after is not None and before is not None else ""
        rank_zero_info(
            f"GradientStabilityPruning: step {trainer.global_step}: sparsity {sparsity:.3f}{shown}"
            f"{'' if accepted else ' (rolled back)'}"
        )

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finalize_compression(trainer, pl_module)

    def finalize_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze the masks into the weights and fill the report. Idempotent: a quantization callback calls it
        first so pruning always finishes before quantization, whatever order the callbacks are listed in."""
        if self._finalized:
            return
        self._finalized = True
        self._remove_hooks()
        self._apply_masks()
        report = report_for(trainer)
        for name, weight in self._unique_weights().items():
            module = self._modules[name]
            bias = getattr(module, "bias", None)
            fp32 = 4 * (weight.numel() + (bias.numel() if isinstance(bias, Tensor) else 0))
            record = report.layers.setdefault(name, LayerRecord(parameters=weight.numel(), bytes_fp32=fp32))
            record.sparsity = float((weight == 0).sum()) / weight.numel()
            record.bytes_compressed = record.bytes_compressed or fp32
        if self.last_metric is not None:
            report.metric_after = self.last_metric
        if self.compact and self.unit_masks:
            self._compact(trainer, pl_module)
        finish_if_last(trainer, pl_module, "pruning")

    def _compact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_compress.compaction import compact

        result = compact(pl_module, self.unit_masks, self._example_input, inplace=True)
        rank_zero_info(f"GradientStabilityPruning: compacted the model: {result}")
        self.masks, self.unit_masks, self._applied = {}, {}, None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": self.stats.state_dict() if self.stats is not None else None,
            "masks": {n: m.cpu() for n, m in self.masks.items()},
            "unit_masks": {n: m.cpu() for n, m in self.unit_masks.items()},
            "baseline_metric": self.baseline_metric,
            "last_metric": self.last_metric,
            "history": copy.deepcopy(self.history),
            "last_tick": self._last_tick,
            "sparsity_cap": self._sparsity_cap,
            "backoffs": self._backoffs,
            "stopped": self._stopped,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # runs after `setup` and before `on_train_start`, which builds the statistics and applies this
        self._pending_state = copy.deepcopy(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        if self.stats is not None and state.get("stats") is not None:
            self.stats.load_state_dict(state["stats"])
        self.masks = dict(state.get("masks", {}))
        self.unit_masks = dict(state.get("unit_masks", {}))
        self.baseline_metric = state.get("baseline_metric")
        self.last_metric = state.get("last_metric")
        self.history = list(state.get("history", []))
        self._last_tick = state.get("last_tick")
        self._sparsity_cap = state.get("sparsity_cap")
        self._backoffs = int(state.get("backoffs", 0))
        self._stopped = bool(state.get("stopped", False))


def _loss_scale(trainer: pl.Trainer) -> float:
    """The loss scale that gradients carry in ``on_after_backward`` (16-bit AMP), else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    return 1.0
