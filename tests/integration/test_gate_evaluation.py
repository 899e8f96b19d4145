"""The gate's evaluation around a pruning event: the validation loop's value reused as "before" only while the
weights are those it measured; the paired subset with its early stop; the rule and samples of each event reported.
Real fits on the built-in digits data."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from lightning_compress import GradientStabilityPruning
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.integration import evaluation, gate_evaluation
from lightning_compress.integration.evaluation import MetricSpec
from lightning_compress.integration.gate_evaluation import has_per_sample_value
from tests.helpers import quiet_trainer, report_of

MICRO = {"average": "micro"}


class _MetricAtValidationEnd(Callback):
    """Our own full evaluation of the weights the validation loop has just measured (runs before the epoch's end)."""

    def __init__(self, spec: MetricSpec) -> None:
        self.spec, self.values = spec, {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.values[trainer.global_step] = evaluation.evaluate(trainer, pl_module, self.spec)


class _TwoForwards(MLPClassifier):
    """A validation_step that runs the model twice: the loop's output is ambiguous, the tap runs its own forward."""

    def validation_step(self, batch, batch_idx) -> None:
        self(batch[0] * 1.0)
        super().validation_step(batch, batch_idx)


class _Logged(Logger):
    """Every (step, metrics) the callbacks send to the loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    name, version = "spy", 0  # type: ignore[assignment]

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))


def _fit(pruning: GradientStabilityPruning, *extra: Callback, max_epochs: int = 3,
         cls: type[MLPClassifier] = MLPClassifier, logger: Logger | bool = False) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = quiet_trainer([*extra, pruning], max_epochs=max_epochs, logger=logger)
    trainer.fit(cls(input_size=64, hidden=[128, 64], lr=1e-2), DigitsDataModule(batch_size=64))
    return trainer


@pytest.mark.parametrize(("cls", "extra_forwards"), [(MLPClassifier, 0), (_TwoForwards, 3 * 5)])
def test_an_event_right_after_validation_reuses_its_value_which_equals_a_full_evaluation(cls, extra_forwards) -> None:
    pruning = GradientStabilityPruning(sparsity=0.8, schedule_unit="epoch", start_step=1, end_step=3, frequency=1,
                                       max_metric_drop=0.02, gate_batches=0, verbose=0)  # "after": the whole set
    spy = _MetricAtValidationEnd(pruning.metric_spec)
    _fit(pruning, spy, cls=cls)
    assert pruning.history
    # the loop's own forward gives the predictions; two calls per step: one more per batch (3 validations x 5)
    assert pruning._tap.extra_forwards == extra_forwards
    for h in pruning.history:
        assert h["gate_evaluation"].startswith("before: reused validation (270 samples)"), h["gate_evaluation"]
        assert h["metric_before"] == pytest.approx(spy.values[h["step"]], abs=1e-6)
        assert h["gate_passes"] == 1 and h["gate_samples"] == 270  # the "after" only, on the whole set


def test_paired_subset_stops_early_and_every_event_says_which_rule_decided_on_how_many_samples() -> None:
    pruning = GradientStabilityPruning(sparsity=0.8, max_metric_drop=0.02, metric_kwargs=MICRO, gate_batches=4,
                                       verbose=0)
    logged = _Logged()
    trainer = _fit(pruning, logger=logged)
    rules = [h["gate_evaluation"] for h in pruning.history]
    assert all("before: " in r and "after: " in r for r in rules)
    name = f"pruning/{pruning.metric_spec.name}"
    sent = [m for _, m in logged.calls if "pruning/sparsity" in m]  # one per event, in order
    assert len(sent) == len(rules)
    for rule, metrics in zip(rules, sent):  # an estimate is never logged under the metric's own name
        early = "after: early stop at" in rule
        assert (name in metrics, f"{name}_estimate" in metrics) == (not early, early), (rule, metrics)
    # a step that changed no prediction: the variance floor and the 3 looks' budget (64, 128, 256) settle it at 256
    assert any("after: early stop at 256 samples" in r for r in rules), rules
    # steps since the last validation: nothing to reuse; the full "before" keeps the per-sample record
    assert any("before: full set, per-sample record kept (270 samples)" in r for r in rules), rules
    for h in pruning.history:  # the gate's verdict is the estimate's: inside the bound kept, outside refused
        assert h["accepted"] == (h["drop"] <= 0.02 + 1e-9)
    stops = 0
    for h in pruning.history:  # samples: the whole set before, the paired ones after (no subset pass)
        stop = re.search(r"before: full set, per-sample record kept \(270 samples\); after: early stop at (\d+) "
                         r"samples", h["gate_evaluation"])
        if stop:
            stops += 1
            assert h["gate_samples"] == 270 + int(stop.group(1)) and h["gate_passes"] == 2
    assert stops
    events = report_of(trainer).events
    assert all(r in e.note for r, e in zip(rules, events))
    for h, e in zip(pruning.history, events):  # an early stop is reported as an estimate, never as the metric
        early = "after: early stop at" in h["gate_evaluation"]
        assert (e.metric_after is None and e.drop is None) == early
        if early:
            est = e.metric_after_estimate
            assert est is not None and est["value"] == pytest.approx(h["metric_after"])
            assert est["low"] <= est["value"] <= est["high"] and est["population"] == 270
            assert f"metric after estimated on {est['samples']} of 270 samples" in e.note


def test_a_step_close_to_the_bound_falls_back_to_the_full_set() -> None:
    """A one-batch subset (64 samples) is too small to settle a step that moves predictions near a 2-point bound:
    such an event is measured on the whole set (before, subset, after: three passes)."""
    pruning = GradientStabilityPruning(sparsity=0.9, max_metric_drop=0.02, metric_kwargs=MICRO, gate_batches=1,
                                       verbose=0)
    _fit(pruning, max_epochs=2)
    fallbacks = [h for h in pruning.history if "after: full set (close to the bound" in h["gate_evaluation"]]
    assert fallbacks and all(h["gate_passes"] == 3 for h in fallbacks if "before: full set" in h["gate_evaluation"])


@pytest.mark.parametrize(
    ("kwargs", "per_sample"),
    [({"average": "micro"}, True), ({}, False), ({"average": "micro", "top_k": 2}, False),
     ({"average": "micro", "ignore_index": 0}, False)],
)
def test_only_micro_top1_accuracy_has_a_per_sample_value(kwargs, per_sample: bool) -> None:
    assert has_per_sample_value(MetricSpec(kwargs=kwargs)) is per_sample


@pytest.mark.parametrize("value", [-1, 1.5])
def test_bad_gate_batches_is_refused_at_construction(value) -> None:
    with pytest.raises((TypeError, ValueError), match=r"`gate_batches` must be an integer"):
        GradientStabilityPruning(gate_batches=value)


def test_align_events_runs_one_event_per_validation_with_its_value_as_before() -> None:
    pruning = GradientStabilityPruning(sparsity=0.7, start_step=5, end_step=45, frequency=5, align_events=True,
                                       max_metric_drop=0.05, verbose=0)
    spy = _MetricAtValidationEnd(pruning.metric_spec)
    _fit(pruning, spy)
    steps = [h["step"] for h in pruning.history]
    assert steps and set(steps) <= set(spy.values), (steps, sorted(spy.values))  # at the validations only
    for h in pruning.history:
        assert h["gate_evaluation"].startswith("before: reused validation"), h["gate_evaluation"]
        assert h["metric_before"] == pytest.approx(spy.values[h["step"]], abs=1e-6)
    assert pruning.current_sparsity() == pytest.approx(0.7, abs=5e-3)  # the ramp's end is reached at a validation


def test_align_events_is_refused_where_it_would_do_nothing() -> None:
    with pytest.raises(ValueError, match=r"`align_events`=True .* `schedule_unit`='epoch'"):
        GradientStabilityPruning(align_events=True, schedule_unit="epoch")


class _Truth:
    """Wraps ``EventEvaluation.after``: each event's "after" as the gate measured it, next to the whole set's."""

    def __init__(self, monkeypatch) -> None:
        self.rows: list[tuple[float, float, float, str]] = []  # (before, measured after, true after, rule)
        original = gate_evaluation.EventEvaluation.after

        def after(measure):
            value = original(measure)
            truth = evaluation.evaluate(measure.trainer, measure.module, measure.spec)
            self.rows.append((measure._before, value, truth, measure.rules[-1]))
            return value

        monkeypatch.setattr(gate_evaluation.EventEvaluation, "after", after)


def test_default_macro_accuracy_uses_the_validations_own_samples_and_decides_as_the_whole_set_would(
        monkeypatch) -> None:
    """Default metric (macro accuracy), default schedule over 4 epochs (events aligned with validation): no pass
    before the step, the "after" stops early on the validation's own samples or, having seen them all, is exact."""
    truth = _Truth(monkeypatch)
    bound = 0.02
    pruning = GradientStabilityPruning(sparsity=0.9, max_metric_drop=bound, verbose=0)
    _fit(pruning, max_epochs=4)
    assert pruning.history and len(truth.rows) == len(pruning.history)
    for h in pruning.history:
        assert h["gate_evaluation"].startswith("before: reused validation (270 samples); after: "), h
        assert "full set" not in h["gate_evaluation"]
        assert h["gate_passes"] == 1 and h["gate_samples"] <= 270  # at most one pass, the "after"
    for before, measured, true, rule in truth.rows:
        if "exact" in rule:
            assert measured == pytest.approx(true, abs=1e-9)
        else:  # an early stop: the verdict the whole set would give
            assert (before - measured <= bound) == (before - true <= bound), (before, measured, true, rule)
    assert any("early stop at" in rule for *_, rule in truth.rows)


def test_gate_batches_zero_measures_every_event_on_the_whole_set() -> None:
    pruning = GradientStabilityPruning(sparsity=0.8, max_metric_drop=0.02, gate_batches=0, verbose=0)
    _fit(pruning, max_epochs=4)
    assert pruning.history
    assert all(h["gate_evaluation"].endswith("after: full set") and h["gate_samples"] == 270 for h in pruning.history)


class _RelabelledOnReread(torch.utils.data.Dataset):
    """Validation data whose labels change each time a sample is read again (a dataset with random augmentation
    of its labels, say): the gate's second read no longer matches what the validation recorded."""

    def __init__(self, base) -> None:
        self.base, self.reads = base, [0] * len(base)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        self.reads[index] += 1
        return x, (y + self.reads[index] - 1) % 10


class _RelabelledDigits(DigitsDataModule):
    def val_dataloader(self):
        loader = super().val_dataloader()
        return torch.utils.data.DataLoader(_RelabelledOnReread(loader.dataset), batch_size=loader.batch_size)


def test_samples_that_no_longer_match_the_validations_record_fall_back_to_the_whole_set() -> None:
    pruning = GradientStabilityPruning(sparsity=0.5, max_metric_drop=0.5, verbose=0)
    pl.seed_everything(0)
    trainer = quiet_trainer([pruning], max_epochs=4)
    trainer.fit(MLPClassifier(input_size=64, hidden=[32], lr=1e-2), _RelabelledDigits(batch_size=64))
    assert pruning.history
    for h in pruning.history:
        assert h["gate_evaluation"].endswith("after: full set (the validation's samples could not be matched)"), h


@pytest.mark.parametrize("metric_kwargs", [{}, MICRO])
def test_a_per_step_schedules_event_keeps_the_full_before_pass_record_and_decides_as_the_whole_set_would(
        monkeypatch, metric_kwargs) -> None:
    """An explicit per-step schedule (events between validations): the event's own full "before" pass keeps the
    per-sample record, and the "after" pairs those samples with the early stop; its verdict is the whole set's, and
    exact once every sample is seen. The report's note says which rule decided, on how many samples."""
    truth = _Truth(monkeypatch)
    bound = 0.02
    pruning = GradientStabilityPruning(sparsity=0.9, start_step=2, end_step=30, frequency=4, max_metric_drop=bound,
                                       metric_kwargs=metric_kwargs, verbose=0)
    trainer = _fit(pruning, max_epochs=2)
    assert len(pruning.history) == len(truth.rows) >= 6
    own = [h for h in pruning.history if not h["gate_evaluation"].startswith("before: reused validation")]
    assert len(own) >= 5  # the rest: a refused step's retry at the next validation, which measured the "before"
    for h in own:
        rule = h["gate_evaluation"]
        assert rule.startswith("before: full set, per-sample record kept (270 samples); after: "), rule
        assert h["gate_passes"] == 2 and 270 < h["gate_samples"] <= 540, h  # one full pass + at most one paired
    for before, measured, true, rule in truth.rows:
        if "exact" in rule or rule.startswith("after: full set"):
            assert measured == pytest.approx(true, abs=1e-6), rule  # torchmetrics computes in float32
        else:  # an early stop: the verdict the whole set would give
            assert (before - measured <= bound) == (before - true <= bound), (before, measured, true, rule)
    assert any("early stop at" in rule for *_, rule in truth.rows)
    notes = [e.note for e in report_of(trainer).events]
    assert all(h["gate_evaluation"] in n for h, n in zip(pruning.history, notes))


class _ShuffledValidation(DigitsDataModule):
    def val_dataloader(self):
        loader = super().val_dataloader()
        return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True,
                                           generator=torch.Generator().manual_seed(0))


def test_a_validation_read_in_no_fixed_order_keeps_no_record_and_pairs_a_seeded_subset_instead() -> None:
    pruning = GradientStabilityPruning(sparsity=0.8, start_step=2, end_step=30, frequency=4, max_metric_drop=0.02,
                                       metric_kwargs=MICRO, gate_batches=4, verbose=0)
    pl.seed_everything(0)
    trainer = quiet_trainer([pruning], max_epochs=2)
    trainer.fit(MLPClassifier(input_size=64, hidden=[128, 64], lr=1e-2), _ShuffledValidation(batch_size=64))
    own = [h for h in pruning.history if not h["gate_evaluation"].startswith("before: reused validation")]
    assert own
    for h in own:  # the whole set before (no record), the subset (4 x 64) before, the paired ones after
        assert h["gate_evaluation"].startswith("before: full set; after: "), h
    stops = [(h, re.search(r"after: early stop at (\d+) samples", h["gate_evaluation"])) for h in own]
    assert any(stop for _, stop in stops)
    for h, stop in stops:
        if stop:
            assert h["gate_samples"] == 270 + 256 + int(stop.group(1)) and h["gate_passes"] == 2
