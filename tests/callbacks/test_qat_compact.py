"""QuantizationAwareTraining with structured pruning and compaction in one fit (``compact=True``): the model is
compacted when QAT starts, QAT trains the codes of the compacted layers, and those codes are delivered; a mid-QAT
checkpoint resumes (the model compacted to its shapes before it is loaded)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file

from lightning_compress import GradientStabilityPruning, QuantizationAwareTraining, load_compressed
from lightning_compress.core.io import UntrustedFileError
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from tests.callbacks.test_qat import assert_delivered_codes
from tests.helpers import StopAfterEpoch, quiet_trainer, report_of

# digits: 1257 training samples, batch 64 -> 20 optimizer steps per epoch; QAT from epoch 1 (step 20)


def _mlp() -> MLPClassifier:
    return MLPClassifier(input_size=64, hidden=[32], lr=3e-3)


class _QATSpy(Callback):
    """While QAT runs: the shapes it quantizes, whether the optimizer holds the model's parameters, the latent
    weight of ``net.1`` at the first and last QAT step."""

    def __init__(self) -> None:
        self.steps = 0
        self.shapes: set[tuple[int, ...]] = set()
        self.stale = 0
        self.first: torch.Tensor | None = None
        self.last: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        qat = next(c for c in trainer.callbacks if isinstance(c, QuantizationAwareTraining))
        if not qat.active:
            return
        self.steps += 1
        self.shapes.add(tuple(qat.quantizers["net.1"].log_gain.shape))
        model_params = {id(p) for p in pl_module.parameters()}
        self.stale += sum(id(p) not in model_params for g in trainer.optimizers[0].param_groups for p in g["params"])
        latent = pl_module.net[1].parametrizations.weight.original.detach().clone()
        self.first = latent if self.first is None else self.first
        self.last = latent


@pytest.fixture(scope="module")
def compacted_fit(tmp_path_factory) -> tuple[pl.Trainer, MLPClassifier, QuantizationAwareTraining, _QATSpy]:
    pl.seed_everything(3)
    root = tmp_path_factory.mktemp("qat-compact")
    pruning = GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, schedule="one_shot",
                                       start_step=10, evaluate=False)
    qat = QuantizationAwareTraining(bits=4, start=1, export_path="model.safetensors")
    spy = _QATSpy()
    model = _mlp()
    trainer = quiet_trainer([pruning, qat, spy], max_epochs=3, default_root_dir=str(root))
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return trainer, model, qat, spy


def test_the_pruned_units_are_gone_and_qat_trained_the_compacted_layers(compacted_fit) -> None:
    _, model, qat, spy = compacted_fit
    width = model.net[1].out_features
    assert 10 <= width <= 22 and model.net[3].in_features == width  # about half of the 32 units removed
    assert spy.steps == 40 and spy.shapes == {(width, 1)}  # every QAT step on the compacted shapes
    assert spy.stale == 0  # the optimizer trained the compacted parameters, not the ones compaction replaced
    assert spy.first is not None and spy.last is not None and not torch.equal(spy.first, spy.last)
    assert qat.result is not None and qat.result.layers["net.1"].qtensor.q.shape == (width, 64)



def test_the_compacted_float_file_holds_the_latent_weights_at_the_end(compacted_fit) -> None:
    trainer, _, _, spy = compacted_fit
    saved = load_file(report_of(trainer).files["compacted"])
    assert spy.last is not None and torch.equal(saved["net.1.weight"], spy.last)  # not the weights QAT started from


def test_the_codes_equal_the_export_bit_for_bit(compacted_fit) -> None:
    _, model, qat, _ = compacted_fit
    assert_delivered_codes(model, qat, bits=4)


def test_load_compressed_and_test_with_the_compressed_checkpoint(compacted_fit) -> None:
    trainer, model, _, _ = compacted_fit
    path = report_of(trainer).files["compressed_checkpoint"]
    fresh = load_compressed(_mlp(), path)
    assert fresh.net[1].out_features == model.net[1].out_features
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    (result,) = trainer.test(model, DigitsDataModule(batch_size=64), ckpt_path=path, verbose=False)
    assert result["test_acc"] == pytest.approx(report_of(trainer).delivered_test_metric)


def test_compaction_at_the_start_of_qat_costs_no_accuracy(compacted_fit) -> None:
    """The same fit with compact=False (the pruned units kept as zeros): the compacted model delivers no less
    than a point and a half under its test accuracy (the resized parameters' Adam moments restart at compaction,
    so the two runs differ; a compacted run ahead of the masked one costs nothing)."""
    trainer, _, _, _ = compacted_fit
    pl.seed_everything(3)
    pruning = GradientStabilityPruning(sparsity=0.5, structured=True, schedule="one_shot", start_step=10,
                                       evaluate=False)
    plain = quiet_trainer([pruning, QuantizationAwareTraining(bits=4, start=1)], max_epochs=3)
    plain.fit(_mlp(), DigitsDataModule(batch_size=64))
    compacted, masked = report_of(trainer).delivered_test_metric, report_of(plain).delivered_test_metric
    assert compacted is not None and masked is not None
    assert compacted > masked - 0.015


class _Steps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *_: Any) -> None:
        self.steps += 1


def _prune_then_qat(start: int) -> list[Callback]:
    pruning = GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, schedule="one_shot",
                                       start_step=10, evaluate=False)
    return [pruning, QuantizationAwareTraining(bits=4, start=start)]


def _checkpoint_after(root, epoch: int, start: int):
    """``last.ckpt`` of a pruning + QAT (from ``start``) fit stopped after ``epoch``."""
    pl.seed_everything(3)
    first = quiet_trainer([*_prune_then_qat(start), ModelCheckpoint(dirpath=root, save_last=True),
                           StopAfterEpoch(epoch)], max_epochs=3, enable_checkpointing=True)
    first.fit(_mlp(), DigitsDataModule(batch_size=64))
    return root / "last.ckpt"


def test_a_mid_qat_checkpoint_of_a_compacting_fit_resumes_to_the_same_codes(compacted_fit, tmp_path) -> None:
    """The checkpoint holds the compacted shapes and moments; the resumed fit builds the model at its full widths,
    is compacted to the checkpoint's shapes before Lightning loads it, and ends with the codes, weights, compacted
    file and report of the uninterrupted fit (the module fixture, same seed and settings), bit for bit."""
    trainer, model, qat, _ = compacted_fit
    path = _checkpoint_after(tmp_path, epoch=1, start=1)  # QAT (and compaction) from epoch 1: mid-QAT
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["state_dict"]["net.1.weight"].shape[0] == model.net[1].out_features < 32
    state = next(v for k, v in checkpoint["callbacks"].items() if "QuantizationAwareTraining" in k)
    assert state["compaction"]["axes"] == {"net.1.bias": {"0": 32}, "net.1.weight": {"0": 32},
                                           "net.3.weight": {"1": 32}}
    resumed_model, callbacks = _mlp(), _prune_then_qat(1)
    resumed = quiet_trainer(callbacks, max_epochs=3)
    resumed.fit(resumed_model, DigitsDataModule(batch_size=64), ckpt_path=str(path))
    again = callbacks[1]
    assert isinstance(again, QuantizationAwareTraining) and again.result is not None and qat.result is not None
    assert set(again.result.layers) == set(qat.result.layers) == {"net.1", "net.3"}
    for name, layer in qat.result.layers.items():
        assert torch.equal(layer.qtensor.q, again.result.layers[name].qtensor.q), name
        assert torch.equal(layer.qtensor.scale, again.result.layers[name].qtensor.scale), name
    for key, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    full, part = report_of(trainer), report_of(resumed)
    assert (part.macs_before, part.macs_after) == (full.macs_before, full.macs_after)
    assert {n: (r.sparsity, r.parameters) for n, r in part.layers.items()} == {
        n: (r.sparsity, r.parameters) for n, r in full.layers.items()}
    saved, expected = load_file(part.files["compacted"]), load_file(full.files["compacted"])
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    fresh = load_compressed(_mlp(), part.files["compressed_checkpoint"])
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def _tampered(tmp_path, change) -> str:
    """The mid-QAT checkpoint of a compacting fit with QAT's state changed by ``change`` (in place)."""
    path = _checkpoint_after(tmp_path / "part", epoch=1, start=1)
    checkpoint = torch.load(path, weights_only=False)
    change(next(v for k, v in checkpoint["callbacks"].items() if "QuantizationAwareTraining" in k))
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    return str(tmp_path / "tampered.ckpt")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda state: state.pop("compaction"), ValueError,
         r"cannot resume from checkpoint '.*tampered\.ckpt': 'net\.1\.bias' is \(\d+,\) there, \(32,\) in this model"
         r".*no record of that compaction.*Allowed: the same callbacks"),
        (lambda state: state["compaction"]["axes"].update({"net.1.weight": {"0": 64}}), UntrustedFileError,
         r"'net\.1\.weight': compacted from sizes \{0: 64\}"),
        (lambda state: state["compaction"]["axes"].pop("net.3.weight"), UntrustedFileError,
         r"key 'net\.3\.weight': declared shape \[10, \d+\], the model has \[10, 32\]"),
        (lambda state: state["compaction"].update(masks={"net.3.weight": torch.ones(10, 32, dtype=torch.bool)}),
         UntrustedFileError, r"compaction\.masks\['net\.3\.weight'\] is shaped \(10, 32\)"),
        (lambda state: state["compaction"].update(file="../../evil.safetensors"), UntrustedFileError,
         r"compaction\.file must be a plain file name"),
    ],
    ids=["no-record", "axes-grow", "axes-missing", "mask-shape", "file-path"],
)
def test_a_mid_qat_checkpoint_without_or_with_a_bad_record_is_refused_before_any_step(
    tmp_path, change, error, match
) -> None:
    """Refused while the checkpoint is restored, before any step, naming the checkpoint and the field; the fresh
    model keeps its full widths."""
    path = _tampered(tmp_path, change)
    fresh, steps = _mlp(), _Steps()
    resumed = quiet_trainer([*_prune_then_qat(1), steps], max_epochs=3)
    with pytest.raises(error, match=match):
        resumed.fit(fresh, DigitsDataModule(batch_size=64), ckpt_path=path)
    assert steps.steps == 0
    assert fresh.net[1].out_features == 32 and fresh.net[1].weight.shape == (32, 64)


def test_a_checkpoint_written_before_qat_started_resumes_a_compacting_fit(tmp_path) -> None:
    """The allowed way: a checkpoint from before QAT (so before compaction) resumes; compaction and QAT follow."""
    path = _checkpoint_after(tmp_path, epoch=1, start=2)
    model, callbacks = _mlp(), _prune_then_qat(2)
    quiet_trainer(callbacks, max_epochs=3).fit(model, DigitsDataModule(batch_size=64), ckpt_path=str(path))
    qat = callbacks[1]
    assert isinstance(qat, QuantizationAwareTraining) and qat.result is not None
    assert model.net[1].out_features < 32  # compacted when QAT started
    assert qat.result.layers["net.1"].qtensor.q.shape[0] == model.net[1].out_features


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_compaction_is_refused_in_setup_under_a_launcher_that_loads_weights_back(strategy: str) -> None:
    """ddp_spawn / ddp_fork load rank zero's final weights into the main process's model, which stays at full
    widths: refused in GradientStabilityPruning.setup, first thing (the same decision on every rank, before any
    collective), naming the callback and what to use instead; the model is untouched. (The launcher decision
    itself: tests/integration/test_strategy.py; QAT under a real ddp_spawn: tests/callbacks/test_qat_ddp.py.)"""
    pruning, qat = _prune_then_qat(1)
    trainer = quiet_trainer([pruning, qat], max_epochs=3, accelerator="cpu", devices=2, strategy=strategy)
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"GradientStabilityPruning\(sparsity=0\.5, criterion=.*structured=True\) "
                                         r"with compact=True cannot run under DDPStrategy launched in worker "
                                         r"processes.*Allowed: strategy='ddp'"):
        pruning.setup(trainer, model, "fit")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
