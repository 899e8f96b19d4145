"""The callbacks' shared protocol: the leader's report, the finishing order, the delivered model's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization
from lightning_compress.callbacks.base import CompressionCallback, ModelNotFiniteError
from lightning_compress.core.accounting import state_bytes
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.reporting import publish
from lightning_compress.reporting.publish import JSON_NAME, MARKDOWN_NAME
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


# ---------------------------------------------------------------------------- where a fit's files go
def _files_of_a_fit(root: Path, seed: int) -> tuple[dict[str, str], MLPClassifier]:
    torch.manual_seed(seed)
    model = _mlp()
    pruning = GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, schedule="one_shot", start_step=3,
                                       evaluate=False)
    quantization = PostTrainingQuantization(bits=4, export_path="model.safetensors")  # relative: in the run's dir
    quiet_trainer([pruning, quantization], max_steps=5, limit_val_batches=2, default_root_dir=root).fit(
        model, DigitsDataModule(batch_size=64))
    return dict(pruning.report.files), model


def test_two_fits_without_a_logger_in_one_root_never_overwrite_each_other(tmp_path: Path) -> None:
    first, _ = _files_of_a_fit(tmp_path, seed=0)
    contents = {key: Path(path).read_bytes() for key, path in first.items()}
    second, _ = _files_of_a_fit(tmp_path, seed=1)
    kinds = {"compressed_checkpoint", "compacted", "quantized", "float_copy", "report_json", "report_markdown"}
    assert kinds <= set(first) and set(first) == set(second)
    runs = tmp_path / publish.RUNS_DIR
    for key in first:
        assert Path(first[key]).parent == runs / "run_0" and Path(second[key]).parent == runs / "run_1", key
        assert Path(first[key]).read_bytes() == contents[key], f"the second fit changed the first fit's {key}"
    assert Path(first["quantized"]).read_bytes() != Path(second["quantized"]).read_bytes()  # two models, two files
    assert not [p for p in tmp_path.iterdir() if p.name != publish.RUNS_DIR]  # nothing in default_root_dir itself


def test_with_a_logger_the_files_go_to_its_log_directory(tmp_path: Path) -> None:
    quantization = PostTrainingQuantization(bits=4, export_path="model.safetensors")
    trainer = quiet_trainer([quantization], max_steps=2, limit_val_batches=1, default_root_dir=tmp_path,
                            logger=CSVLogger(tmp_path))
    trainer.fit(_mlp(), DigitsDataModule(batch_size=64))
    log_dir = Path(trainer.loggers[0].log_dir)
    assert {Path(p).parent for p in quantization.report.files.values()} == {log_dir}
    assert not (tmp_path / publish.RUNS_DIR).exists()


# ---------------------------------------------------------------------------- a fit that runs no training step
@pytest.mark.parametrize("trainer_kwargs", [
    {"max_epochs": 0},
    {"max_steps": 0},
    {"limit_train_batches": 0},
    {"limit_train_batches": 0.0},
], ids=str)
@pytest.mark.parametrize("callback", [PostTrainingQuantization, GradientStabilityPruning])
def test_a_fit_that_trains_no_step_is_refused_in_setup(tmp_path: Path, trainer_kwargs, callback) -> None:
    (name, value), = trainer_kwargs.items()
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer([callback()], default_root_dir=tmp_path, **trainer_kwargs)
    with pytest.raises(ValueError, match=rf"Trainer\(`{name}`={value!r}\) runs no training step, so "
                                         rf"{callback.__name__} would never run"):
        trainer.fit(model, DigitsDataModule(batch_size=64))
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.rglob("*.*"))  # no file written


# ---------------------------------------------------------------------------- a model that is not finite
class _PoisonAtFinish(_Recorder):
    """Writes a NaN into a weight in its ``_finish``: the model is broken after every compression callback ran."""

    def _finish(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.net[1].weight[0, 0] = float("nan")


def test_a_model_that_is_not_finite_at_delivery_gets_no_compressed_artifact(tmp_path: Path) -> None:
    callback = _PoisonAtFinish("poison", 0, [])
    with pytest.raises(ModelNotFiniteError, match=r"not finite at the end of the fit \(NaN / inf in net\.1\.weight\)"
                                                  r".*no compressed\.ckpt is written"):
        quiet_trainer([callback], max_steps=2, limit_val_batches=1, default_root_dir=tmp_path).fit(
            _mlp(), DigitsDataModule(batch_size=64))
    assert not list(tmp_path.rglob("*.ckpt"))
    (report_path,) = tmp_path.rglob(JSON_NAME)
    report = json.loads(report_path.read_text())
    assert report["failure"].startswith("ModelNotFiniteError: the model is not finite")
    assert report["delivered"] == {"val": None, "test": None}  # the broken model is not presented as delivered
    assert "compressed_checkpoint" not in report["files"]
    assert "FAILED, nothing delivered" in (report_path.parent / MARKDOWN_NAME).read_text()


class _PoisonLastBatch(pl.Callback):
    """A NaN in a weight after the last optimizer step: a fit that diverged at its very end."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == trainer.max_steps:
            with torch.no_grad():
                pl_module.net[3].weight[1, 1] = float("inf")


def test_a_diverged_fit_with_the_quantization_callback_raises_and_reports_it(tmp_path: Path) -> None:
    quantization = PostTrainingQuantization(bits=4, export_path="model.safetensors")
    with pytest.raises(ModelNotFiniteError, match=r"net\.3\.weight"):
        quiet_trainer([_PoisonLastBatch(), quantization], max_steps=3, limit_val_batches=1,
                      default_root_dir=tmp_path).fit(_mlp(), DigitsDataModule(batch_size=64))
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("*.safetensors"))
    report = json.loads(next(tmp_path.rglob(JSON_NAME)).read_text())
    assert report["failure"].startswith("ModelNotFiniteError") and "net.3.weight" in report["failure"]
    assert report["delivered"] == {"val": None, "test": None}


class _NoTrainingBatches(DigitsDataModule):
    def train_dataloader(self):
        empty = torch.utils.data.TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
        return torch.utils.data.DataLoader(empty, batch_size=8)


@pytest.mark.parametrize("callback", [PostTrainingQuantization, GradientStabilityPruning])
def test_a_fit_whose_training_loop_is_skipped_raises_instead_of_compressing_nothing(tmp_path: Path,
                                                                                    callback) -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"{callback.__name__} never ran: the fit trained no step"):
        quiet_trainer([callback()], max_epochs=1, limit_val_batches=1, default_root_dir=tmp_path).fit(
            model, _NoTrainingBatches(batch_size=64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob(JSON_NAME))
