"""QuantizationAwareTraining(activations="int8") on real data (digits, SmallCNN): the input ranges are learned in the
fit, validated, carried, exported as they are to static integer kernels, kept by compressed.ckpt and by a resume."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_compress import PostTrainingQuantization, QuantizationAwareTraining, export_onnx, load_compressed
from lightning_compress.core.io import UntrustedFileError
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import SmallCNN
from lightning_compress.integration.compressed_checkpoint import ACTIVATIONS_KEY, CHECKPOINT_KEY
from lightning_compress.quantization.carried import carried
from lightning_compress.serving._trained import fake_quantize
from tests.helpers import StopAfterEpoch, quiet_trainer, report_of

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# digits: 20 optimizer steps per epoch at batch 64; QAT from epoch 1 of 3. int8 weights at the default scale_lr (the
# weights' lr: with linear scales Adam drove some ~1e-3 per-channel int8 steps to the clamp floor; log space fixed it)
LAYERS = ("net.0", "net.4", "net.9", "net.11")


def _cnn() -> SmallCNN:
    return SmallCNN(image_size=8, channels=[8, 16], hidden=32, lr=3e-3)


def _qat(**kwargs: Any) -> QuantizationAwareTraining:
    return QuantizationAwareTraining(bits=8, start=1, activations="int8", **kwargs)


class _RangeSpy(Callback):
    """Per validation: whether the layers' inputs were fake-quantized; per QAT step: the ranges."""

    def __init__(self) -> None:
        self.hooked: list[bool] = []
        self.ranges: list[dict[str, tuple[float, int]]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.hooked.append(all(len(pl_module.get_submodule(n)._forward_pre_hooks) == 1 for n in LAYERS))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        qat = next(c for c in trainer.callbacks if isinstance(c, QuantizationAwareTraining))
        if qat.input_quantizers:
            self.ranges.append({n: q.range() for n, q in qat.input_quantizers.items()})


def _fit(callbacks: list[Callback], max_epochs: int = 3, ckpt_path: str | None = None,
         **kwargs: Any) -> tuple[pl.Trainer, SmallCNN]:
    pl.seed_everything(3)
    model = _cnn()
    trainer = quiet_trainer(callbacks, max_epochs=max_epochs, **kwargs)
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return trainer, model


def _data() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    x, y = (torch.cat(parts) for parts in zip(*data.val_dataloader()))
    train = [batch[0] for batch in data.train_dataloader()]
    return x, y, train


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@dataclass
class Trained:
    trainer: pl.Trainer
    model: SmallCNN
    qat: QuantizationAwareTraining
    spy: _RangeSpy


@pytest.fixture(scope="module")
def trained() -> Trained:
    spy = _RangeSpy()
    qat = _qat()
    trainer, model = _fit([qat, spy])
    return Trained(trainer, model.eval(), qat, spy)


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("value", "match"),
    [("int4", "`activations` must be one of .*'int8'.*, got 'int4'"), ("INT8", "got 'INT8'"),
     (8, "`activations` must be one of .*, got 8"), (True, "got True")],
)
def test_a_bad_activations_argument_is_refused_in_the_constructor(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(activations=value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the fit
def test_ranges_are_learned_from_start_on_and_validation_sees_them(trained: Trained) -> None:
    assert trained.spy.hooked == [False, True, True]  # epoch 0 float, QAT from epoch 1
    assert len(trained.spy.ranges) == 40
    first, last = trained.spy.ranges[0], trained.spy.ranges[-1]
    assert set(first) == set(LAYERS)
    assert all(first[n][0] != last[n][0] for n in LAYERS), (first, last)  # trained away from the first batch's
    assert all(last[n][1] == 0 for n in LAYERS[1:])  # behind a ReLU: zero point 0
    record = carried(trained.model)
    assert record is not None
    assert record.activations == {f"{n}.weight": last[n] for n in LAYERS}  # the last step's, exactly
    assert not any(m._forward_pre_hooks for m in trained.model.modules())  # the model is plain after the fit


# --------------------------------------------------------------------------- the export
def test_the_static_export_writes_the_trained_ranges_and_computes_the_fake_quantized_model(
    trained: Trained, tmp_path: Path
) -> None:
    x, _, _ = _data()
    path = tmp_path / "qat.onnx"
    report = export_onnx(trained.model, path, x[:8], activations="static")  # no calibration data needed
    assert {n: layer.runtime_op for n, layer in report.layers.items()} == {
        "net.0": "QLinearConv", "net.4": "QLinearConv", "net.9": "QGemm", "net.11": "QGemm"}
    graph = onnx.load(path).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    written = {(float(inits[n.input[1]].reshape(())), int(inits[n.input[2]].reshape(())))
               for n in graph.node if n.op_type == "QuantizeLinear"}
    record = carried(trained.model)
    assert record is not None
    assert written == {(float(np.float32(s)), z) for s, z in record.activations.values()}

    reference = copy.deepcopy(trained.model)
    fake_quantize(reference, {k.rpartition(".")[0]: r for k, r in record.activations.items()})
    with torch.no_grad():
        want = reference(x).numpy()
    got = _ort(path, x)
    relative = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"\nORT static vs fake-quantized PyTorch on {len(x)} digits: max relative error {relative:.2e}, argmax "
          f"agreement {(got.argmax(1) == want.argmax(1)).mean():.4f}")
    assert relative < 1e-2
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99


def test_accuracy_of_the_qat_static_export_beside_ptq_static_with_calibration(
    trained: Trained, tmp_path: Path
) -> None:
    x, y, train = _data()
    export_onnx(trained.model, tmp_path / "qat.onnx", x[:8], activations="static")
    ptq_trainer, ptq_model = _fit([PostTrainingQuantization(bits=8)])
    export_onnx(ptq_model.eval(), tmp_path / "ptq.onnx", x[:8], activations="static",
                calibration_data=torch.cat(train)[:512])
    qat_acc = float((_ort(tmp_path / "qat.onnx", x).argmax(1) == y.numpy()).mean())
    ptq_acc = float((_ort(tmp_path / "ptq.onnx", x).argmax(1) == y.numpy()).mean())
    with torch.no_grad():
        float_acc = float((ptq_trainer.lightning_module(x).argmax(1) == y).float().mean())
    print(f"\ndigits val ({len(x)}), SmallCNN 3 epochs, ORT static int8: QAT (trained ranges) {qat_acc:.4f}, PTQ "
          f"(calibrated on 512 training images) {ptq_acc:.4f}; PTQ's weights-only model in PyTorch {float_acc:.4f}")
    assert qat_acc > 0.8 and ptq_acc > 0.8  # both are classifiers; no margin between them is claimed


# --------------------------------------------------------------------------- checkpoints
def test_compressed_checkpoint_and_load_compressed_keep_the_ranges_exactly(trained: Trained) -> None:
    path = report_of(trained.trainer).files["compressed_checkpoint"]
    record = carried(trained.model)
    assert record is not None
    fresh = load_compressed(_cnn(), path)
    loaded = carried(fresh)
    assert loaded is not None and loaded.activations == record.activations
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint[CHECKPOINT_KEY][ACTIVATIONS_KEY]) == {f"{n}.weight" for n in LAYERS}


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ([0.1, 0], "activation ranges must be a dict, got list"),
        ({"net.99.weight": [0.1, 0]}, "'net.99.weight', which is not a quantized weight"),
        ({"net.0.weight": [0.1]}, "must be \\[scale, zero_point\\]"),
        ({"net.0.weight": [0.0, 0]}, "scale must be a finite number > 0, got 0.0"),
        ({"net.0.weight": [float("inf"), 0]}, "scale must be a finite number > 0, got inf"),
        ({"net.0.weight": [0.1, 300]}, "zero point must be an integer in 0..255, got 300"),
        ({"net.0.weight": [0.1, 1.5]}, "zero point must be an integer in 0..255, got 1.5"),
    ],
)
def test_malformed_ranges_in_a_compressed_checkpoint_are_refused(
    trained: Trained, tmp_path: Path, entry: object, match: str
) -> None:
    checkpoint = torch.load(report_of(trained.trainer).files["compressed_checkpoint"], weights_only=True)
    checkpoint[CHECKPOINT_KEY][ACTIVATIONS_KEY] = entry
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UntrustedFileError, match=match):
        load_compressed(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed
    assert carried(model) is None


def test_a_resume_from_a_mid_qat_checkpoint_gives_the_same_ranges_and_codes(trained: Trained, tmp_path: Path) -> None:
    _fit([_qat(), ModelCheckpoint(dirpath=tmp_path, save_last=True), StopAfterEpoch(1)],
         enable_checkpointing=True)  # QAT ran in epoch 1
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if "QuantizationAwareTraining" in k)
    assert set(state["activations"]) == {f"{n}.weight" for n in LAYERS}
    assert len(state["optimizer"]["state"]) == 2 * len(LAYERS)  # weight scales and log steps: their moments
    resumed = _qat()
    _, model = _fit([resumed], ckpt_path=str(tmp_path / "last.ckpt"))
    full, again = carried(trained.model), carried(model)
    assert full is not None and again is not None
    assert again.activations == full.activations
    for key, qt in full.codes.items():
        assert torch.equal(again.codes[key].q, qt.q) and torch.equal(again.codes[key].scale, qt.scale), key


# --------------------------------------------------------------------------- forward signatures
class _DictModel(pl.LightningModule):
    """A forward taking a dict and a keyword argument: the input quantizers are pre-hooks on the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.head = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)
        self.losses: list[float] = []

    def forward(self, batch: dict[str, torch.Tensor], *, temperature: float = 1.0) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(batch["x"].flatten(1)))) / temperature

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self({"x": x}, temperature=2.0), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_a_forward_taking_a_dict_and_kwargs_trains_with_activation_fake_quantization() -> None:
    model = _DictModel()
    qat = QuantizationAwareTraining(bits=8, start=1, activations="int8")
    pl.seed_everything(3)
    quiet_trainer([qat], max_epochs=2, limit_val_batches=0).fit(model, DigitsDataModule(batch_size=64))
    record = carried(model)
    assert record is not None and set(record.activations) == {"encoder.weight", "head.weight"}
    assert "forward" not in vars(model) and not any(m._forward_pre_hooks for m in model.modules())
    assert len(model.losses) == 40 and all(np.isfinite(model.losses))
    assert sum(model.losses[-5:]) < sum(model.losses[:5])
