"""``GradientStabilityPruning``: prune during training from running gradient statistics.

The callback gathers what only the Trainer knows and hands it to :class:`lightning_compress.pruning.run.PruningRun`
(statistics of each optimizer step, the schedule's events: metric before, new masks broadcast from rank zero,
metric after, the gate's verdict, an exact rollback). Under accumulation only the last micro-batch of a window is
counted, under 16-bit AMP the loss scale is divided out, under DDP the gradients are already all-reduced.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_compress.callbacks.base import compression_callbacks
from lightning_compress.callbacks.pruning_events import PruningEvents
from lightning_compress.core.accounting import layer_float_bytes
from lightning_compress.core.selection import DEFAULT_MODULE_TYPES, Selection
from lightning_compress.integration import _compat
from lightning_compress.integration.evaluation import DEFAULT_METRIC, first_inputs
from lightning_compress.integration.gate_evaluation import ValidationTap
from lightning_compress.integration.strategy import check_compaction_launcher
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.grid import grid_misfits, grid_round_to
from lightning_compress.pruning.run import PruningRun
from lightning_compress.pruning.schedule import PruningSchedule
from lightning_compress.pruning.structured import analyse, check_round_to
from lightning_compress.pruning.tracked import TrackedLayers
from lightning_compress.structure.kinds import FOLLOWER_TYPES  # the BatchNorm types
from lightning_compress.structure.shape_rules import compacted_axes, encode

COMPACTED_FILE = "model.compact.safetensors"  # with compact=True, in the run's log directory
STRUCTURED_MODULE_TYPES = (*DEFAULT_MODULE_TYPES, "MultiheadAttention")  # structured: heads of nn.MultiheadAttention


class GradientStabilityPruning(PruningEvents):
    """Prune weights (or whole neurons / channels / attention heads) whose gradients stay near zero and stable.

    Args (the README's table says more): ``sparsity`` (final fraction of the tracked weights, structured: of the
    units; None to prune by ``mean_threshold`` / ``std_threshold``), ``criterion`` (``weighted_stability``
    |w|·(|mean g| + std g), ``stability``, ``magnitude``, ``taylor``), ``structured`` (with ``structured_target``
    ``units`` or ``macs``, and ``compact`` to remove the pruned units at the end; the structured planner's
    ``normalize``, ``round_to`` and ``macs_exponent``, see :mod:`lightning_compress.pruning.planner`), ``scope``,
    ``schedule`` (``polynomial`` / ``constant`` / ``one_shot``) with ``schedule_unit``, ``start_step``, ``end_step``,
    ``frequency``, ``amount``, ``initial_sparsity``; ``min_keep``, ``restart_statistics``, ``statistics``
    (``per_weight_every``: per-weight statistics of every k-th step),
    ``module_types`` / ``include`` / ``exclude``, ``metric`` / ``metric_kwargs``, ``max_metric_drop`` and
    ``metric_reference`` (the gate), ``on_violation`` and ``patience`` (a refused step is retried ``patience``
    ticks later or at the next validation, see :mod:`lightning_compress.pruning.controller`), ``evaluate``,
    ``verbose`` (0, 1, 2), ``gate_batches`` (the gate's "after" on a seeded subset of that many validation batches
    with an early stop, see :mod:`lightning_compress.integration.gate_evaluation`), ``align_events`` (per-step
    events due during an epoch wait for its validation, whose value is their "before"; None: on when no per-step
    schedule was given, see :func:`lightning_compress.callbacks.pruning_events.auto_alignment`). A fit that
    delivers less than ``sparsity`` warns once, naming the refused events.
    """

    finish_order = 0
    report_name = "pruning"
    writes_compacted = True  # the compacted model written when compacted (AdaptiveCompression: after its checks)

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
        per_weight_every: int = 2,
        module_types: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        metric: str = DEFAULT_METRIC,
        metric_kwargs: dict[str, Any] | None = None,
        max_metric_drop: float | None = None,
        metric_reference: Literal["previous", "initial"] = "previous",
        on_violation: Literal["backoff", "stop"] = "backoff",
        evaluate: bool = True,
        compact: bool = False,
        verbose: int = 1,
        structured_target: Literal["units", "macs"] = "units",
        normalize: Literal["none", "mean", "median"] = "none",
        round_to: int = 1,
        macs_exponent: float = 0.5,
        patience: int | None = None,
        gate_batches: int | None = None,
        align_events: bool | None = None,
    ) -> None:
        super().__init__(metric, metric_kwargs, max_metric_drop, metric_reference)
        self.config = PruningConfig(
            sparsity, criterion, structured, scope, schedule, schedule_unit, start_step, end_step, frequency, amount,
            initial_sparsity, mean_threshold, std_threshold, min_keep, restart_statistics, statistics, on_violation,
            evaluate, compact, verbose, structured_target, normalize=normalize, round_to=round_to,
            macs_exponent=macs_exponent, patience=patience, gate_batches=gate_batches,
            align_events=align_events, per_weight_every=per_weight_every,
        )
        self._tap = ValidationTap(self.metric_spec)  # the gate's metric during Lightning's validation loop
        defaults = STRUCTURED_MODULE_TYPES if structured else DEFAULT_MODULE_TYPES
        self.selection = Selection.from_args(module_types, include, exclude, defaults)
        self._pending_state: dict[str, Any] | None = None
        self._grid_source: str | None = None  # the quantizer whose group size sets round_to in this fit
        self._reset_run()

    def _reset_run(self, pl_module: pl.LightningModule | None = None, layers: TrackedLayers | None = None,
                   config: PruningConfig | None = None) -> None:
        """A fresh run: a callback instance used for a second fit starts from nothing."""
        self.run = PruningRun(config or self.config, self.gate, self.metric_reference, pl_module, layers)
        self._example_input: Any = None
        self._compacted = False
        self._final: tuple[float, float] | None = None  # (sparsity, weight sparsity) delivered, once finished
        self._compacted_axes: dict[str, dict[str, int]] = {}  # which axes compaction shrank, for compressed.ckpt
        self._optimizer_steps = 0  # weights changed since a validation: its metric is no "before" any more

    @property
    @override
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(criterion=c.criterion, structured=c.structured, sparsity=c.sparsity,
                                        selection=self.selection.describe())

    def settings(self) -> dict[str, Any]:
        return {**self.config.as_dict(), **super().settings(), "module_types": list(self.selection.module_types),
                "include": list(self.selection.include), "exclude": list(self.selection.exclude)}

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._guard_checkpoint_loading(pl_module)
            return
        if self.config.compact:  # before any collective: every rank decides the same
            check_compaction_launcher(trainer, f"{type(self).__name__}({self._describe()})")
        self._setup_fit(trainer, pl_module, needs_metric=self.config.evaluate or self.max_metric_drop is not None)
        layers = TrackedLayers.trainable(self.selection.select(pl_module))
        if not len(layers):
            raise ValueError(f"{self.selection.describe()} select no trainable module of {type(pl_module).__name__}: "
                             "nothing to prune")
        self._check_no_overlap(trainer, pl_module, layers)
        self._reset_run(pl_module, layers, self._on_grid(trainer))  # the schedule follows in on_train_start
        if self.config.structured and getattr(pl_module, "example_input_array", None) is not None:
            self._analyse(pl_module, pl_module.example_input_array)  # decided before any step

    def _schedule(self, trainer: pl.Trainer) -> PruningSchedule:
        """The fit's schedule. Read in ``on_train_start``, not ``setup``: ``trainer.estimated_stepping_batches``
        sets up the train data when first read, and read in ``setup`` (before Lightning restores a checkpoint) it
        makes Lightning skip restoring the loader's position, so a run resumed mid-epoch restarts its epoch."""
        c = self.config
        total = trainer.max_epochs if c.schedule_unit == "epoch" else trainer.estimated_stepping_batches
        length = int(total) if total is not None and total not in (-1, float("inf")) else None
        return PruningSchedule.for_fit(c.schedule, c.sparsity if c.sparsity is not None else 1.0, length,
                                       c.schedule_unit, c.start_step, c.end_step, c.frequency, c.amount,
                                       c.initial_sparsity)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run.schedule = self._schedule(trainer)
        self._decide_alignment(trainer)
        self.run.start_statistics()
        if self._pending_state is not None:
            self.run.load_state_dict(self._pending_state)
            self._pending_state = None
        self.state.bind()
        self.state.attach(trainer.optimizers)
        _warn_frozen_batchnorm(pl_module)

    def _check_no_overlap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layers: TrackedLayers) -> None:
        """Two pruning callbacks over the same layers would each mask what the other keeps and count the other's
        pruning as their own: refused, naming both."""
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]  # set by a connector
        for other in compression_callbacks(trainer):
            if other is self or not isinstance(other, GradientStabilityPruning):
                continue
            shared = sorted(set(layers.names) & set(other.selection.select(pl_module)))
            if shared:
                mine, theirs = (f"trainer.callbacks[{callbacks.index(c)}] ({c._describe()})" for c in (self, other))
                raise ValueError(
                    f"two GradientStabilityPruning callbacks prune the same layers {shared}: {mine} and {theirs}; "
                    "allowed: one pruning callback per layer (split the layers with `include` / `exclude`)"
                )

    def _on_grid(self, trainer: pl.Trainer) -> PruningConfig:
        """The fit's settings: with compaction and a per-group ``PostTrainingQuantization`` in the same Trainer,
        ``round_to`` becomes its ``group_size`` (see :mod:`lightning_compress.pruning.grid`), in the report too."""
        from lightning_compress.callbacks.quantization import PostTrainingQuantization

        c, self._grid_source = self.config, None
        sizes = sorted({q.spec.group_size for q in compression_callbacks(trainer)
                        if isinstance(q, PostTrainingQuantization) and q.spec.granularity == "per_group"})
        if not (c.structured and c.compact and sizes):
            return c
        group_size = math.lcm(*sizes)
        source = f"PostTrainingQuantization(granularity='per_group', group_size={'/'.join(map(str, sizes))})"
        if c.sparsity is None:
            raise ValueError(f"structured pruning by thresholds (`sparsity`=None) with compact=True cannot keep "
                             f"compacted widths multiples of {group_size}, which {source} in the same Trainer needs; "
                             "allowed: a `sparsity` target, or compact=False")
        round_to = grid_round_to(c.round_to, group_size, source)
        self._grid_source = source
        self.report.settings[self.report_name].update(round_to=round_to, round_to_set_by=source)
        return replace(c, round_to=round_to)

    def _describe(self) -> str:
        c = self.config
        return f"sparsity={c.sparsity!r}, criterion={c.criterion!r}, structured={c.structured}"

    def _analyse(self, pl_module: pl.LightningModule, example_input: Any) -> None:
        self._example_input = example_input
        self.state.groups, table = analyse(pl_module, example_input, self.layers.names)
        round_to = self.run.config.round_to
        check_round_to(round_to, self.layers.names, self.state.groups, self.layers.num_units())
        misfits = grid_misfits(self.layers.names, self.state.groups, self.layers.num_units(), round_to)
        if self._grid_source is not None and misfits:  # on a quantizer's grid: what rounding cannot fix
            raise ValueError(f"structured pruning with compact=True must leave widths that are multiples of {round_to}"
                             f" ({self._grid_source} in the same Trainer), and these layers "
                             f"cannot: {misfits}; allowed: leave them out with `exclude`, or a `group_size` dividing "
                             "their widths")
        rank_zero_info(f"GradientStabilityPruning: which layers can lose units\n{table}")

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any) -> None:
        if self.config.structured and self.state.groups is None:  # no example_input_array: the first batch, as
            # the hook has it (reading the loader again would start a second pass over it: not resumable)
            self._analyse(pl_module, first_inputs(trainer, pl_module, "structured pruning", batch))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _compat.is_last_micro_batch(trainer):  # earlier micro-batches: .grad is a partial sum
            self.run.collect(grad_scale=_compat.loss_scale(trainer))

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.state.apply_to_grads()
        self._optimizer_steps += 1

    # ------------------------------------------------------------------ end of fit
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze the masks into the weights, fill the report's layers and (``compact``) remove pruned units."""
        if self._compacted:  # done already: QuantizationAwareTraining finished it when it started (qat.compaction)
            return
        self.state.detach()
        self.state.apply()
        self._final = (self.state.sparsity(), self.state.weight_sparsity())
        self._check_target(self._final[0])
        per_layer = self.layers.layer_mask_sparsity(self.masks)
        groups = self.state.groups or {}
        for (name, module), weight in zip(self.layers.modules.items(), self.layers.weights()):
            record = self.report.record_layer(name, weight.numel(), layer_float_bytes(module, weight))
            record.sparsity = per_layer[name]
            if getattr(groups.get(name), "dead", False):  # unused output: dead code, not units pruning removed
                record.note = "dead code: the model's output does not depend on it (not pruned; remove it)"
        if self.config.compact and self.unit_masks:
            self._compact(trainer, pl_module)

    def _compact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the pruned units (a smaller dense model), measure its MACs and save it in the log directory (when
        :attr:`writes_compacted`)."""
        from lightning_compress.structure.compaction import compact
        from lightning_compress.structure.macs import macs_per_example

        self.report.macs_before = macs_per_example(pl_module, self._example_input)
        result = compact(pl_module, self.unit_masks, self._example_input, inplace=True)
        self.report.macs_after = macs_per_example(pl_module, self._example_input)
        rank_zero_info(f"GradientStabilityPruning: compacted the model: {result}")
        self.state.clear()
        self.run.stats = None  # of the full widths, finished: a checkpoint written after (mid-QAT) must not hold them
        self._compacted = True
        self._compacted_axes = encode(compacted_axes(pl_module))
        if self.writes_compacted:  # AdaptiveCompression writes it only once its checks passed
            self._save_compacted(trainer, pl_module)

    def _save_compacted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rank zero writes the compacted model to the run's :data:`COMPACTED_FILE`; the report lists it."""
        from lightning_compress.structure.compaction import save_compacted

        path = Path(self.run_dir(trainer)) / COMPACTED_FILE
        if trainer.is_global_zero:
            save_compacted(pl_module, path)
        self.report.files["compacted"] = str(path.resolve())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.state.detach()
        self._tap.detach()
        super().teardown(trainer, pl_module, stage)

    def checkpoint_details(self) -> dict[str, Any]:
        return {"compacted": self._compacted, "pruned": self.weight_sparsity() if not self._compacted else None,
                "compacted_axes": self._compacted_axes}

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)  # applied in on_train_start, once the statistics exist


def _warn_frozen_batchnorm(pl_module: pl.LightningModule) -> None:
    """Warn when BatchNorm layers start the fit in eval mode (Lightning's ``fit`` does not call ``train()``: a
    model left in eval mode, e.g. by an accuracy check, trains so). Their running statistics then stay those of
    the unpruned model while pruning removes the channels they were measured with: nothing renormalizes the next
    layers, and a pruning event can throw the fit off (a ResNet-18 fine-tune fell to chance within 10 steps of its
    first structured event; the same run in train mode kept 96.8 %)."""
    frozen = [name for name, module in pl_module.named_modules()
              if isinstance(module, FOLLOWER_TYPES) and module.track_running_stats
              and not module.training]
    if frozen:
        shown = ", ".join(frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
        rank_zero_warn(f"GradientStabilityPruning: {len(frozen)} BatchNorm layer(s) are in eval mode at the start "
                       f"of training ({shown}): their running statistics stay fixed while pruning removes channels, "
                       "which can make the fit diverge; call `model.train()` before `fit` unless they are frozen on "
                       "purpose")
