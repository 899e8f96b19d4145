"""The validation's per-sample record: which metrics it serves, and its per-sample weights give the metric exactly
(macro accuracy: each class's recall counts alike). Random tensors: a unit test of the arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.integration.evaluation import MetricSpec
from lightning_compress.integration.gate_record import SampleRecord, paired_weighting

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
