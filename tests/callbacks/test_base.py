"""The callbacks' shared protocol: the leader's report, the finishing order, the delivered model's evaluation."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelPruning

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization
from lightning_compress.callbacks.base import CompressionCallback
from lightning_compress.core.accounting import state_bytes
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from tests.helpers import quiet_trainer, report_of
from tests.integration.test_evaluation_helpers import accuracy_of


class _Recorder(CompressionCallback):
    def __init__(self, name: str, order: int, log: list[str]) -> None:
        super().__init__()
        self.report_name, self.finish_order, self.calls = name, order, log

    def setup(self, trainer, pl_module, stage):
        self._setup_fit(trainer, pl_module, needs_metric=False)

    def _finish(self, trainer, pl_module):
        self.calls.append(self.report_name)


def _mlp() -> MLPClassifier:
    return MLPClassifier(input_size=64, hidden=[32], lr=5e-3)


def test_callbacks_finish_in_order_once_and_the_leader_holds_the_report() -> None:
    log: list[str] = []
    late, early = _Recorder("late", 10, log), _Recorder("early", 0, log)
    trainer = quiet_trainer([late, early], max_steps=3)
    model = _mlp()
    snapshot = state_bytes(model)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    assert log == ["early", "late"]
    assert late.report is early.report and late._report is not None and early._report is None
    assert late.report.model_state_bytes == snapshot  # taken in setup, before anything changed
    assert set(late.report.settings) == {"late", "early"}
    assert not hasattr(trainer, "_lightning_compress_report")  # nothing hung on the Trainer


def test_the_delivered_model_is_evaluated_on_val_and_test_data() -> None:
    pl.seed_everything(0)
    quantization = PostTrainingQuantization(bits=4)
    data = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer([quantization], max_epochs=2)
    model = _mlp()
    trainer.fit(model, data)
    report = report_of(trainer)
    assert report.delivered_metric == pytest.approx(accuracy_of(model, data.val_dataloader()))
    assert report.delivered_test_metric == pytest.approx(accuracy_of(model, data.test_dataloader()))
    assert report.metric_after == report.delivered_metric


def test_a_second_fit_with_the_same_callback_starts_fresh() -> None:
    pruning = GradientStabilityPruning(sparsity=0.6, schedule="one_shot", start_step=5, evaluate=False)
    for _ in range(2):
        model = _mlp()
        trainer = quiet_trainer([pruning], max_steps=8)
        trainer.fit(model, DigitsDataModule(batch_size=64))
        assert len(pruning.history) == 1 and pruning.history[0]["accepted"]
        assert (model.net[1].weight == 0).float().mean() > 0.3
        assert len(report_of(trainer).events) == 1


def test_lightning_model_pruning_in_the_same_trainer_is_refused_in_setup() -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer([ModelPruning("l1_unstructured", amount=0.5), PostTrainingQuantization()], max_steps=3)
    with pytest.raises(ValueError, match="ModelPruning"):
        trainer.fit(model, DigitsDataModule(batch_size=64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reparametrised_weights_are_refused(tmp_path: Path) -> None:
    model = _mlp()
    torch.nn.utils.prune.l1_unstructured(model.net[1], "weight", amount=0.3)
    with pytest.raises(ValueError, match=r"re-parametrised weights, found in \['net.1'\]"):
        quiet_trainer([GradientStabilityPruning()], max_steps=3).fit(model, DigitsDataModule(batch_size=64))
