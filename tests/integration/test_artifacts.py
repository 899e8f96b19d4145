"""The compressed model through the Lightning lifecycle: checkpoints that hold it, `trainer.test(ckpt_path=...)`,
one loader for every artifact, exports that never overwrite another run's."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization, load_compressed
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.integration.artifacts import artifact_kind, read_checkpoint_entry
from tests.helpers import quiet_trainer, report_of
from tests.integration.test_evaluation_helpers import accuracy_of


def _mlp() -> MLPClassifier:
    return MLPClassifier(input_size=64, hidden=[64, 32], lr=5e-3)


def _fit(callbacks, tmp_path: Path, **kwargs):
    pl.seed_everything(0)
    model, data = _mlp(), DigitsDataModule(batch_size=64)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max", save_top_k=1)
    trainer = quiet_trainer([*callbacks, checkpoint], max_epochs=3, enable_checkpointing=True,
                            default_root_dir=tmp_path, **kwargs)
    trainer.fit(model, data)
    return trainer, model, data


def _structured() -> GradientStabilityPruning:
    return GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, schedule="one_shot", start_step=20)


def test_compact_then_test_with_the_compressed_checkpoint(tmp_path: Path) -> None:
    trainer, model, data = _fit([_structured()], tmp_path)
    compressed = Path(report_of(trainer).files["compressed_checkpoint"])
    assert read_checkpoint_entry(compressed)["stage"] == "compressed"
    assert read_checkpoint_entry(compressed)["compacted"] is True
    expected = accuracy_of(model, data.test_dataloader())
    (result,) = trainer.test(model, data, ckpt_path=str(compressed), verbose=False)
    assert result["test_acc"] == pytest.approx(expected, abs=1e-6)
    # a fresh Trainer with the callback, a fresh full-size model: the checkpoint rebuilds the compacted shapes
    fresh = _mlp()
    (again,) = quiet_trainer([_structured()]).test(fresh, data, ckpt_path=str(compressed), verbose=False)
    assert again["test_acc"] == pytest.approx(expected, abs=1e-6)
    assert fresh.net[1].weight.shape == model.net[1].weight.shape != (64, 64)


def test_a_checkpoint_from_before_compression_is_refused_not_silently_loaded(tmp_path: Path) -> None:
    trainer, model, data = _fit([PostTrainingQuantization(bits=4)], tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="holds the model as it was during training"):
        trainer.test(model, data, ckpt_path="best", verbose=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantize_then_test_the_checkpoint_gives_the_quantized_metric(tmp_path: Path) -> None:
    trainer, model, data = _fit([PostTrainingQuantization(bits=2, granularity="per_tensor")], tmp_path)
    compressed = report_of(trainer).files["compressed_checkpoint"]
    quantized_acc = accuracy_of(model, data.test_dataloader())
    float_model = _mlp()
    best = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    float_model.load_state_dict(best["state_dict"])
    assert accuracy_of(float_model, data.test_dataloader()) != pytest.approx(quantized_acc, abs=1e-6)
    (result,) = trainer.test(model, data, ckpt_path=compressed, verbose=False)
    assert result["test_acc"] == pytest.approx(quantized_acc, abs=1e-6)
    assert read_checkpoint_entry(compressed)["quantized"] == {"net.1": 2, "net.3": 2, "net.5": 2}


@pytest.mark.parametrize("kind", ["checkpoint", "quantized", "compacted", "float"])
def test_load_compressed_round_trips_every_artifact(tmp_path: Path, kind: str) -> None:
    callbacks = [_structured(), PostTrainingQuantization(bits=4, export_path="model.int4.safetensors")]
    trainer, model, data = _fit(callbacks, tmp_path)
    files = report_of(trainer).files
    path = {"checkpoint": files["compressed_checkpoint"], "quantized": files["quantized"],
            "compacted": files["compacted"], "float": files["float_copy"]}[kind]
    assert artifact_kind(path) == kind
    loaded = load_compressed(_mlp(), path)
    x = next(iter(data.test_dataloader()))[0]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        if kind in ("checkpoint", "quantized"):  # the delivered model, bit for bit
            assert torch.equal(loaded(x), model(x))
        else:  # compacted / float copy: the pruned model before quantization
            assert loaded.net[1].weight.shape == model.net[1].weight.shape


def test_two_runs_with_the_same_config_keep_both_exports(tmp_path: Path) -> None:
    paths = []
    for _ in range(2):
        trainer, _, _ = _fit([PostTrainingQuantization(bits=4, export_path="model.int4.safetensors")], tmp_path,
                             logger=pl.loggers.CSVLogger(tmp_path))
        paths.append(Path(report_of(trainer).files["quantized"]))
    assert paths[0] != paths[1] and all(p.is_file() for p in paths)
    assert {p.parent.name for p in paths} == {"version_0", "version_1"}


def test_an_absolute_export_path_is_never_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"another run's export")
    with pytest.raises(ValueError, match="already exists"):
        _fit([PostTrainingQuantization(bits=4, export_path=str(target))], tmp_path)
    assert target.read_bytes() == b"another run's export"
