"""The report tells the truth about what the fit delivered (issue: honest numbers), checked on real data."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from tests.helpers import quiet_trainer
from tests.integration.test_evaluation_helpers import accuracy_of


def _json_report(trainer: pl.Trainer) -> dict:
    (path,) = Path(trainer.default_root_dir).rglob("compression_report.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_every_kept_pruning_step_is_within_the_bound_when_training_from_scratch() -> None:
    pl.seed_everything(2)
    bound = 0.01
    pruning = GradientStabilityPruning(sparsity=0.95, schedule="polynomial", start_step=10, end_step=110,
                                       frequency=10, max_metric_drop=bound, criterion="magnitude")
    trainer = quiet_trainer([pruning], max_epochs=7)
    trainer.fit(MLPClassifier(input_size=64, hidden=[64, 32], lr=1e-2), DigitsDataModule(batch_size=64))
    events = [e for e in _json_report(trainer)["events"] if e["kind"] == "prune"]
    kept = [e for e in events if e["accepted"]]
    assert kept and any(not e["accepted"] for e in events), "a 95 % target with a 1-point bound must refuse a step"
    for e in events:  # the gate's definition: the metric measured immediately before the step
        assert e["reference"] == e["metric_before"]
        if e["metric_after"] is None:  # the 'after' stopped early: an estimate, whose interval decided
            estimate = e["metric_after_estimate"]
            assert e["metric_drop"] is None and estimate["samples"] < estimate["population"]
            worst, best = e["metric_before"] - estimate["low"], e["metric_before"] - estimate["high"]
            assert worst <= bound + 1e-9 if e["accepted"] else best > bound
            continue
        assert e["metric_drop"] == pytest.approx(e["metric_before"] - e["metric_after"])
        assert e["metric_drop"] <= bound + 1e-9 if e["accepted"] else e["metric_drop"] > bound


def _structured() -> GradientStabilityPruning:
    return GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, schedule="one_shot", start_step=30)


RUNS = {
    "prune_only": lambda: [GradientStabilityPruning(sparsity=0.7, start_step=10, end_step=40)],
    "quantize_only": lambda: [PostTrainingQuantization(bits=3, granularity="per_tensor")],
    "prune_then_quantize": lambda: [PostTrainingQuantization(bits=4), GradientStabilityPruning(sparsity=0.7)],
    "structured_compact": lambda: [_structured()],
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_the_reported_final_metric_is_the_delivered_models(run: str) -> None:
    pl.seed_everything(0)
    model, data = MLPClassifier(input_size=64, hidden=[64, 32], lr=5e-3), DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(RUNS[run](), max_epochs=3)
    trainer.fit(model, data)
    report = _json_report(trainer)
    assert report["metric_after"] == pytest.approx(accuracy_of(model, data.val_dataloader()), abs=1e-6)
    assert report["delivered"]["test"] == pytest.approx(accuracy_of(model, data.test_dataloader()), abs=1e-6)
    if run == "prune_only":  # not the metric of the last pruning event: the model trained on after it
        assert report["pruning"]["sparsity"] == pytest.approx(report["sparsity"], abs=1e-6)
        assert report["metric_before"] is None  # no uncompressed model exists to compare with
    if "quantize" in run:  # the float model at the end of training vs the quantized one
        assert report["quantization"]["metric_quantized"] == report["metric_after"]
        assert report["metric_before"] == report["quantization"]["metric_float"]
    if run == "quantize_only":
        assert report["sparsity"] == 0.0 and report["pruning"] is None


def test_pruning_figures_can_be_monitored_by_lightning_callbacks(tmp_path: Path) -> None:
    pl.seed_everything(0)
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=5, evaluate=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="pruning/sparsity", mode="max", save_top_k=1)
    stopping = EarlyStopping(monitor="pruning/sparsity", mode="max", stopping_threshold=0.49, patience=100)
    trainer = quiet_trainer([pruning, checkpoint, stopping], max_epochs=5, enable_checkpointing=True)
    trainer.fit(MLPClassifier(input_size=64, hidden=[32]), DigitsDataModule(batch_size=64))
    assert float(trainer.callback_metrics["pruning/sparsity"]) == pytest.approx(0.5, abs=0.01)
    assert trainer.current_epoch == 1, "EarlyStopping saw the sparsity reach its threshold after the first epoch"
    assert checkpoint.best_model_score is not None
    assert float(checkpoint.best_model_score) == pytest.approx(0.5, abs=0.01)
