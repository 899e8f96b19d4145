"""A refused pruning step is retried and the fit reaches its target, or says it did not (issue 21), in real fits on
the built-in digits data: the first event, at step 2, meets an untrained model and a tight bound."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.integration import evaluation
from lightning_compress.reporting.render import headline
from lightning_compress.reporting.summary import summarize
from tests.helpers import quiet_trainer, report_of


def _fit(pruning: GradientStabilityPruning, hidden: list[int], max_epochs: int) -> tuple[pl.Trainer, list[str]]:
    pl.seed_everything(0)
    trainer = quiet_trainer([pruning], max_epochs=max_epochs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MLPClassifier(input_size=64, hidden=hidden, lr=1e-2), DigitsDataModule(batch_size=64))
    return trainer, [str(w.message) for w in caught if "fell short of its target" in str(w.message)]


def test_an_early_refusal_is_retried_once_the_model_recovers_and_the_target_is_reached() -> None:
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=2, max_metric_drop=0.0,
                                       verbose=0)
    trainer, shortfalls = _fit(pruning, [128, 64], max_epochs=3)
    first, *later = pruning.history
    assert first["step"] == 2 and not first["accepted"], "the untrained model's step must be refused"
    assert later and all(h["step"] > 2 for h in later), "the refused step was never retried"
    assert later[-1]["accepted"] and later[-1]["sparsity_tried"] >= 0.5 - 1e-3
    assert all(h["drop"] <= 1e-9 for h in pruning.history if h["accepted"])  # each kept step within the bound
    assert pruning.current_sparsity() >= 0.5 - 1e-3 and shortfalls == []
    gate = report_of(trainer).gate["pruning"]
    assert gate["target_sparsity"] == 0.5 and gate["delivered_sparsity"] >= 0.5 - 1e-3 and gate["shortfall"] is None
    assert "delivered 0." not in headline(summarize(report_of(trainer)))  # met: the headline does not cry wolf


def test_a_target_out_of_reach_warns_once_naming_the_refused_events_and_the_headline_says_it() -> None:
    pruning = GradientStabilityPruning(sparsity=0.95, criterion="magnitude", schedule="one_shot", start_step=2,
                                       max_metric_drop=0.0, verbose=0)
    trainer, shortfalls = _fit(pruning, [64, 32], max_epochs=2)
    delivered = pruning.current_sparsity()
    assert delivered < 0.9
    refused = [h for h in pruning.history if not h["accepted"]]
    assert len(shortfalls) == 1 and refused
    for h in refused:
        assert f"step {h['step']} (to {h['sparsity_tried']:.3f}): the metric dropped by" in shortfalls[0]
    assert f"target 0.95, delivered {delivered:.2f}" in headline(summarize(report_of(trainer)))


def test_stop_on_violation_keeps_the_old_behaviour_no_retry() -> None:
    pruning = GradientStabilityPruning(sparsity=0.95, criterion="magnitude", schedule="one_shot", start_step=2,
                                       max_metric_drop=0.0, on_violation="stop", verbose=0)
    _, shortfalls = _fit(pruning, [64, 32], max_epochs=2)
    assert [h["step"] for h in pruning.history] == [2] and pruning.controller.stopped
    assert pruning.current_sparsity() == 0.0 and len(shortfalls) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patience": 0}, r"`patience` must be an integer .*got 0"),
        ({"patience": 2.5}, r"`patience` must be an integer"),
        ({"patience": 3, "on_violation": "stop"}, r"`patience`=3 spaces the retries .*'stop' retries none"),
    ],
)
def test_bad_patience_is_refused_at_construction(kwargs, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        GradientStabilityPruning(**kwargs)


def _steps_per_epoch(trainer: pl.Trainer) -> int:
    return int(trainer.estimated_stepping_batches) // int(trainer.max_epochs or 1)


def test_without_a_per_step_schedule_events_align_with_validation_and_reuse_its_value() -> None:
    pruning = GradientStabilityPruning(sparsity=0.6, max_metric_drop=0.05, verbose=0)
    trainer, _ = _fit(pruning, [128, 64], max_epochs=4)
    settings = report_of(trainer).settings["pruning"]
    assert settings["align_events"] is None and settings["events_aligned"] is True
    assert settings["events_aligned_by"].startswith("auto: on")
    per_epoch = _steps_per_epoch(trainer)
    steps = [h["step"] for h in pruning.history]
    assert steps and all(step % per_epoch == 0 for step in steps), (steps, per_epoch)  # at the epochs' ends
    assert all(h["gate_evaluation"].startswith("before: reused validation") for h in pruning.history)
    assert pruning.current_sparsity() == pytest.approx(0.6, abs=5e-3)  # the ramp's end still reached


@pytest.mark.parametrize(
    ("kwargs", "max_epochs", "trainer_kwargs", "reason"),
    [
        ({"start_step": 3}, 4, {}, "auto: off (explicit per-step schedule (start_step))"),
        ({"frequency": 2, "end_step": 20}, 4, {}, "auto: off (explicit per-step schedule (end_step, frequency))"),
        ({}, 3, {}, "auto: off (the last event falls in the fit's last epoch (3)"),
        ({}, 4, {"check_val_every_n_epoch": 2}, "auto: off (validation not once per epoch)"),
        ({"align_events": False}, 4, {}, "set by align_events"),
        ({"schedule": "constant"}, 4, {}, "auto: off (the schedule has no last event"),
    ],
)
def test_events_stay_at_their_steps_where_alignment_is_not_automatic(kwargs, max_epochs, trainer_kwargs,
                                                                       reason) -> None:
    pruning = GradientStabilityPruning(sparsity=0.5, verbose=0, **kwargs)
    pl.seed_everything(0)
    trainer = quiet_trainer([pruning], max_epochs=max_epochs, **trainer_kwargs)
    trainer.fit(MLPClassifier(input_size=64, hidden=[32], lr=1e-2), DigitsDataModule(batch_size=64))
    settings = report_of(trainer).settings["pruning"]
    assert settings["events_aligned"] is False and settings["events_aligned_by"].startswith(reason)
    per_epoch = _steps_per_epoch(trainer)
    assert any(h["step"] % per_epoch for h in pruning.history)  # some event ran mid-epoch, at its own step


def test_align_events_must_be_true_false_or_none() -> None:
    with pytest.raises(TypeError, match=r"`align_events` must be True or False, got 'auto'"):
        GradientStabilityPruning(align_events="auto")  # type: ignore[arg-type]


def _count_evaluations(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = evaluation.evaluate

    def counted(trainer, pl_module, spec, loaders=None):
        if loaders is None:  # the validation data (the test data's evaluation is counted apart)
            calls.append(1)
        return original(trainer, pl_module, spec, loaders)

    monkeypatch.setattr(evaluation, "evaluate", counted)
    return calls


@pytest.mark.parametrize("with_quantization", [False, True])
def test_the_delivered_metric_is_the_last_validations_when_it_measured_the_delivered_weights(
        monkeypatch, with_quantization: bool) -> None:
    calls = _count_evaluations(monkeypatch)
    pruning = GradientStabilityPruning(sparsity=0.5, evaluate=False, verbose=0)
    extra = [PostTrainingQuantization(bits=8)] if with_quantization else []
    pl.seed_everything(0)
    trainer = quiet_trainer([pruning, *extra], max_epochs=2)
    model = MLPClassifier(input_size=64, hidden=[32], lr=1e-2)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    delivered = report_of(trainer).delivered_metric
    full = evaluation.evaluate(trainer, model, pruning.metric_spec)  # the model handed back, measured now
    assert delivered == pytest.approx(full, abs=1e-6)
    validation_passes = len(calls) - 1  # the last call is ours, just above
    # pruning alone: no validation pass at the end (the last validation measured these weights); with quantization
    # (weights changed after pruning) the delivered model is evaluated again, besides the quantizer's own passes
    assert (validation_passes == 0) is (not with_quantization)
