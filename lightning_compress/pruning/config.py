"""The pruning callback's settings, validated in one place before any training step. No Lightning import.

:class:`PruningConfig` holds what ``GradientStabilityPruning``'s flat (YAML-friendly) arguments say; every check
raises an error that names the argument, the value received and what is allowed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lightning_compress.core.validation import check_bool, check_choice, check_number
from lightning_compress.pruning.criteria import CRITERIA, GRADIENT_CRITERIA
from lightning_compress.pruning.schedule import SCHEDULES, check_schedule_args

SCOPES = ("global", "layer")
SCHEDULE_UNITS = ("step", "epoch")
STATISTICS = ("auto", "per_weight", "per_unit")
ON_VIOLATION = ("backoff", "stop")
STRUCTURED_TARGETS = ("units", "macs")
NORMALIZATIONS = ("none", "mean", "median")


@dataclass(frozen=True)
class PruningConfig:
    sparsity: float | None = 0.8
    criterion: str = "weighted_stability"
    structured: bool = False
    scope: str = "global"
    schedule: str = "polynomial"
    schedule_unit: str = "step"
    start_step: int | None = None
    end_step: int | None = None
    frequency: int | None = None
    amount: float = 0.2
    initial_sparsity: float = 0.0
    mean_threshold: float | None = None
    std_threshold: float | None = None
    min_keep: float = 0.0
    restart_statistics: bool = False
    statistics: str = "auto"
    on_violation: str = "backoff"
    evaluate: bool = True
    compact: bool = False
    verbose: int = 1
    structured_target: str = "units"
    # structured planner settings (see lightning_compress.pruning.planner's docstring for what was measured)
    normalize: str = "none"  # "mean" / "median": unit scores divided by their layer's before the global ranking
    round_to: int = 1  # each layer keeps a multiple of this many units (channels, neurons; not heads)
    macs_exponent: float = 0.5  # structured_target="macs": rank by score / (MACs saved) ** macs_exponent
    # a refused step is retried this many ticks later or at the next validation (None: at the next validation)
    patience: int | None = None
    # the gate's "after" on this many validation batches per rank with an early stop (top-1 accuracy; else full set);
    # None: the validation's own samples when it just ran (see integration.gate_record), 0: always the full set
    gate_batches: int | None = None
    # an event due during an epoch waits for that epoch's validation (one event per epoch, its "before" reused);
    # None: the callback decides (aligned when no per-step schedule was given, see callbacks.pruning_events)
    align_events: bool | None = None
    # per-weight statistics of every k-th optimizer step: half their cost at k=2, and on real fits the masks differ
    # only among near-tied weights, accuracy unchanged (benchmarks/bench_stats_sampling.py)
    per_weight_every: int = 2

    def __post_init__(self) -> None:
        self._check_target()
        check_choice("criterion", self.criterion, CRITERIA)
        if self.sparsity is None and self.criterion not in GRADIENT_CRITERIA:
            raise ValueError(f"thresholds act on gradient statistics; `criterion` {self.criterion!r} tracks none")
        for name in ("structured", "restart_statistics", "evaluate", "compact"):
            check_bool(name, getattr(self, name))
        if self.align_events is not None:
            check_bool("align_events", self.align_events)
        check_choice("scope", self.scope, SCOPES)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("schedule_unit", self.schedule_unit, SCHEDULE_UNITS)
        check_schedule_args(
            self.schedule, self.start_step, self.end_step, self.frequency, self.amount, self.initial_sparsity,
            self.sparsity,
        )
        check_number("min_keep", self.min_keep, low=0, high=1, high_inclusive=False)
        if self.sparsity is not None and self.min_keep > 0 and self.min_keep >= 1 - self.sparsity - 1e-9:
            raise ValueError(
                f"`min_keep`={self.min_keep} reserves at least as many weights per layer as `sparsity`={self.sparsity}"
                f" keeps in total ({1 - self.sparsity:.4g} of them), so the floors alone would decide every mask; use "
                f"a `min_keep` below {1 - self.sparsity:.4g} (0 keeps one entry per layer)"
            )
        check_choice("statistics", self.statistics, STATISTICS)
        if self.structured and self.statistics == "per_weight":
            raise ValueError("`statistics`='per_weight' does not apply to structured=True: units use 'per_unit'")
        check_number("per_weight_every", self.per_weight_every, low=1, integer=True)
        if self.per_weight_every != 2 and not self.per_weight_statistics:
            raise ValueError(f"`per_weight_every`={self.per_weight_every} samples per-weight statistics, which this "
                             "configuration does not track, so it would do nothing; allowed: statistics='per_weight' "
                             "or 'auto' with structured=False and a gradient criterion, or leave `per_weight_every` "
                             "at 2")
        check_choice("on_violation", self.on_violation, ON_VIOLATION)
        if self.align_events and self.schedule_unit != "step":
            raise ValueError(f"`align_events`=True moves per-step events to the epoch's validation; with "
                             f"`schedule_unit`={self.schedule_unit!r} events already follow it; allowed: "
                             "schedule_unit='step'")
        if self.gate_batches is not None:
            check_number("gate_batches", self.gate_batches, low=0, integer=True)
        if self.patience is not None:
            check_number("patience", self.patience, low=1, integer=True)
            if self.on_violation == "stop":
                raise ValueError(f"`patience`={self.patience} spaces the retries of refused steps, but `on_violation`="
                                 "'stop' retries none; allowed: on_violation='backoff', or patience=None")
        if self.compact and not self.structured:
            raise ValueError("`compact`=True removes pruned units, so it needs structured=True")
        check_number("verbose", self.verbose, low=0, high=2, integer=True)
        check_choice("structured_target", self.structured_target, STRUCTURED_TARGETS)
        if self.structured_target != "units" and not self.structured:
            raise ValueError(f"`structured_target`={self.structured_target!r} counts the MACs of removed units, so it "
                             "needs structured=True; allowed without it: 'units'")

        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_number("round_to", self.round_to, low=1, integer=True)
        check_number("macs_exponent", self.macs_exponent, low=0, high=1)
        self._check_no_argument_idle()

    def _check_no_argument_idle(self) -> None:
        """Refuse a planner setting that this configuration never reads (it would silently do nothing)."""
        defaults = {"normalize": "none", "round_to": 1, "macs_exponent": 0.5}
        needs = {"normalize": "structured=True", "round_to": "structured=True",
                 "macs_exponent": "structured=True and structured_target='macs'"}
        read = {"normalize": self.structured, "round_to": self.structured,
                "macs_exponent": self.structured and self.structured_target == "macs"}
        for name, default in defaults.items():
            value = getattr(self, name)
            if value == default:
                continue
            if not read[name]:
                raise ValueError(f"`{name}`={value!r} is a setting of the structured planner that only "
                                 f"{needs[name]} reads, so here it would do nothing; allowed: {needs[name]}, or "
                                 f"leave `{name}` at {default!r}")
            if self.sparsity is None:
                raise ValueError(f"`{name}`={value!r} shapes a `sparsity` target, but `sparsity` is None (pruning by "
                                 f"thresholds), so it would do nothing; allowed: a `sparsity`, or leave `{name}` at "
                                 f"{default!r}")

    def _check_target(self) -> None:
        thresholds = (self.mean_threshold, self.std_threshold)
        if self.sparsity is None:
            if None in thresholds:
                raise ValueError(
                    "`sparsity` is None, so both `mean_threshold` and `std_threshold` must be given, got "
                    f"mean_threshold={self.mean_threshold!r}, std_threshold={self.std_threshold!r}"
                )
        else:
            check_number("sparsity", self.sparsity, low=0, high=1, high_inclusive=False)
            if thresholds != (None, None):
                raise ValueError(
                    f"give either `sparsity` (got {self.sparsity!r}) or `mean_threshold`/`std_threshold` (got "
                    f"{self.mean_threshold!r}/{self.std_threshold!r}), not both; set `sparsity: null` to prune by "
                    "thresholds"
                )
        for name in ("mean_threshold", "std_threshold"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low=0)

    @property
    def tracks_gradients(self) -> bool:
        return self.criterion in GRADIENT_CRITERIA

    @property
    def per_weight_statistics(self) -> bool:
        if not self.tracks_gradients or self.structured:
            return False
        return self.statistics in ("auto", "per_weight")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
