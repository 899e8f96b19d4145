"""The validation's per-sample record: which metrics it serves, and its per-sample weights give the metric exactly
(macro accuracy: each class's recall counts alike). Random tensors: a unit test of the arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.integration.evaluation import MetricSpec
from lightning_compress.integration.gate_evaluation import EventEvaluation
from lightning_compress.integration.gate_record import SampleRecord, paired_weighting
from tests.helpers import quiet_trainer

_ONE_RANK = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor))


@pytest.mark.parametrize(
    ("kwargs", "weighting"),
    [({}, "macro"), ({"average": "macro"}, "macro"), ({"average": "micro"}, "micro"),
     ({"average": "weighted"}, "micro"), ({"average": "none"}, None), ({"top_k": 2}, None),
     ({"ignore_index": 0}, None), ({"multidim_average": "samplewise"}, None)],
)
def test_which_accuracies_have_a_paired_per_sample_rule(kwargs, weighting) -> None:
    assert paired_weighting(MetricSpec(kwargs=kwargs)) == weighting


def test_other_metrics_have_none() -> None:
    assert paired_weighting(MetricSpec("torchmetrics.classification.MulticlassF1Score")) is None


def _recorded(weighting: str, preds: torch.Tensor, target: torch.Tensor, batch: int = 16) -> SampleRecord:
    record = SampleRecord(list(range(len(target))), weighting)  # type: ignore[arg-type]
    for start in range(0, len(target), batch):
        record.update(preds[start: start + batch], target[start: start + batch])
    return record


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_weighted_per_sample_mean_is_the_metric(average: str) -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.cat([torch.full((n,), k) for k, n in enumerate([5, 40, 13, 2])])  # unbalanced classes
    preds = torch.randn(len(target), 4, generator=generator) + 1.5 * torch.nn.functional.one_hot(target, 4)
    spec = MetricSpec(kwargs={"average": average})
    record = _recorded(paired_weighting(spec), preds, target)  # type: ignore[arg-type]
    assert record.finish(_ONE_RANK, 4) and record.population == len(target)
    value = float((record.weights[record.target] * record.correct).mean())
    expected = float(MulticlassAccuracy(num_classes=4, average=average)(preds, target))
    assert value == pytest.approx(expected, abs=1e-6)  # torchmetrics computes in float32
    assert torch.equal(record.positions, torch.arange(len(target)))


def test_macro_with_a_class_missing_from_the_set_is_not_served() -> None:
    target = torch.tensor([0, 1, 1, 0, 1])  # class 2 of 3 has no sample: the macro average depends on predictions
    preds = torch.randn(5, 3)
    assert not _recorded("macro", preds, target).finish(_ONE_RANK, 3)
    assert _recorded("micro", preds, target).finish(_ONE_RANK, 3)


@pytest.mark.parametrize(
    ("preds", "target"),
    [(torch.randn(4), torch.tensor([0, 1, 0, 1])),  # one score per sample: no top-1 over classes
     (torch.randn(4, 3), torch.rand(4)),  # float targets
     (torch.randn(4, 3, 2), torch.zeros(4, 2, dtype=torch.long))],  # per-position labels
)
def test_a_layout_other_than_class_scores_records_nothing(preds, target) -> None:
    record = _recorded("micro", preds, target)
    assert not record.valid and not record.finish(_ONE_RANK, 3)


@pytest.mark.parametrize("average", ["macro", "micro"])
def test_the_full_before_pass_keeps_a_record_whose_weighted_mean_is_the_value_it_measured(average: str) -> None:
    """A digits model after a short fit: the gate's own full "before" pass (no validation to reuse) records every
    validation sample once, in the order of the dataset, and the record's weighted correctness is that pass's
    metric."""
    pl.seed_everything(0)
    trainer = quiet_trainer([], max_epochs=1)
    model = MLPClassifier(input_size=64, hidden=[32], lr=1e-2)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    measure = EventEvaluation(trainer, model, MetricSpec(kwargs={"average": average}), None, None, lambda _: 0.01)
    before = measure.before()
    record = measure.record
    assert record is not None and measure.rules == ["before: full set, per-sample record kept (270 samples)"]
    assert record.positions.tolist() == list(range(270)) and record.population == 270
    assert measure.evaluations == 1 and measure.samples == 270  # one pass, nothing more
    weighted = float((record.correct * record.weights[record.target]).mean())
    assert weighted == pytest.approx(before, abs=1e-6)
