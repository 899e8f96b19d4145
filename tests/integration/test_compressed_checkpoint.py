"""``compressed.ckpt`` holds the compressed model (issue 20 item 4): packed codes, no optimizer state, within 10 % of
the export's size; it loads through ``load_compressed`` and ``trainer.test/validate/predict(ckpt_path=...)`` with
the callbacks, fails naming ``load_compressed`` without them, and is refused by ``fit(ckpt_path=...)``."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization, load_compressed
from lightning_compress.core.io import UntrustedFileError
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.integration.artifacts import checkpoint_entry
from lightning_compress.integration.compressed_checkpoint import CHECKPOINT_KEY, PACKED_KEY, SENTINEL, pack
from lightning_compress.quantization.carried import carried
from tests.helpers import quiet_trainer, report_of


def _mlp() -> MLPClassifier:
    return MLPClassifier(input_size=64, hidden=[512, 256], lr=5e-3)  # big enough that a checkpoint's fixed overhead
    # (zip records, hyper-parameters) is small beside the export


def _structured() -> GradientStabilityPruning:
    return GradientStabilityPruning(sparsity=0.3, structured=True, compact=True, schedule="one_shot", start_step=10)


SETUPS = {
    "int8": lambda: [PostTrainingQuantization(bits=8, export_path="model.safetensors")],
    "int4": lambda: [PostTrainingQuantization(bits=4, export_path="model.safetensors")],
    "structured_int8": lambda: [_structured(), PostTrainingQuantization(bits=8, export_path="model.safetensors")],
}


@dataclass
class Fit:
    trainer: pl.Trainer
    model: MLPClassifier
    data: DigitsDataModule
    checkpoint: Path
    export: Path


@pytest.fixture(scope="module", params=sorted(SETUPS))
def fit(request: pytest.FixtureRequest) -> Fit:
    pl.seed_everything(0)
    model, data = _mlp(), DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(SETUPS[request.param](), max_epochs=1, limit_train_batches=15)
    trainer.fit(model, data)
    files = report_of(trainer).files
    return Fit(trainer, model.eval(), data, Path(files["compressed_checkpoint"]), Path(files["quantized"]))


def _logits(model: torch.nn.Module, data: DigitsDataModule) -> torch.Tensor:
    x = next(iter(data.test_dataloader()))[0]
    with torch.no_grad():
        return model.eval()(x)


def test_it_holds_the_packed_model_and_is_within_10_percent_of_the_export(fit: Fit) -> None:
    checkpoint = torch.load(fit.checkpoint, weights_only=True)
    assert not {"optimizer_states", "lr_schedulers", "loops", "callbacks"} & set(checkpoint)
    entry = checkpoint[CHECKPOINT_KEY]
    assert entry["stage"] == "compressed" and entry["format"].endswith("/2")
    assert entry[PACKED_KEY].dtype == torch.uint8
    assert all(value.numel() == 0 for value in checkpoint["state_dict"].values())  # no float copy of any weight
    assert SENTINEL in checkpoint["state_dict"] and checkpoint["hyper_parameters"]["hidden"] == [512, 256]
    size, export = os.path.getsize(fit.checkpoint), os.path.getsize(fit.export)
    assert size <= 1.1 * export, f"compressed.ckpt {size} B, export {export} B"


def test_load_compressed_gives_the_delivered_logits_and_carries_the_codes(fit: Fit) -> None:
    loaded = load_compressed(_mlp(), fit.checkpoint)
    assert torch.equal(_logits(loaded, fit.data), _logits(fit.model, fit.data))
    record = carried(loaded)
    assert record is not None and not record.stale(loaded)
    assert set(record.codes) == set(carried(fit.model).codes)


@pytest.mark.parametrize("how", ["test", "validate", "predict"])
def test_lightning_loads_it_with_the_callbacks(fit: Fit, how: str) -> None:
    x = next(iter(fit.data.test_dataloader()))[0]
    expected = _logits(fit.model, fit.data)
    for model, trainer in ((fit.model, fit.trainer), (_mlp(), quiet_trainer(SETUPS["int8"]()))):
        if how == "predict":
            (predicted,) = trainer.predict(model, DataLoader(x, batch_size=len(x)), ckpt_path=str(fit.checkpoint))
            assert torch.equal(predicted, expected)
        else:
            getattr(trainer, how)(model, fit.data, ckpt_path=str(fit.checkpoint), verbose=False)
        assert torch.equal(_logits(model, fit.data), expected)
        assert carried(model) is not None and not carried(model).stale(model)


@pytest.mark.parametrize("strict", [True, False])
def test_without_the_callbacks_it_fails_and_leaves_the_model_alone(fit: Fit, strict: bool) -> None:
    model = _mlp()
    model.strict_loading = strict
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        quiet_trainer([]).test(model, fit.data, ckpt_path=str(fit.checkpoint), verbose=False)
    message = str(info.value)
    assert "size mismatch for net.1.weight: copying a param with shape torch.Size([0])" in message
    if strict:  # the unexpected key says what to do
        assert "load_compressed(model, path)" in message, message
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_fit_from_it_is_refused_naming_the_checkpoints_to_resume_from(fit: Fit) -> None:
    model = _mlp()
    trainer = quiet_trainer(SETUPS["int8"](), max_epochs=2)
    with pytest.raises(ValueError, match="not a checkpoint to resume training from") as info:
        trainer.fit(model, fit.data, ckpt_path=str(fit.checkpoint))
    assert "last.ckpt" in str(info.value) and str(fit.checkpoint) in str(info.value)


@pytest.mark.parametrize("bad", ["float_blob", "truncated", "expanded"])
def test_a_malformed_packed_entry_is_refused_naming_the_file(fit: Fit, tmp_path: Path, bad: str) -> None:
    checkpoint = torch.load(fit.checkpoint, weights_only=True)
    blob = checkpoint[CHECKPOINT_KEY][PACKED_KEY]
    checkpoint[CHECKPOINT_KEY][PACKED_KEY] = {"float_blob": blob.float(), "truncated": blob[: len(blob) // 2],
                                              "expanded": torch.zeros(1, dtype=torch.uint8).expand(10**9)}[bad]
    path = tmp_path / "bad.ckpt"
    torch.save(checkpoint, path)
    model = _mlp()
    with pytest.raises(UntrustedFileError) as info:
        load_compressed(model, path)
    assert str(path) in str(info.value) and PACKED_KEY in str(info.value)
    assert model.net[1].weight.shape == (512, 64)


def test_a_compressed_checkpoint_of_format_1_still_loads(fit: Fit, tmp_path: Path) -> None:
    """Before format 2, compressed.ckpt held the delivered float state_dict and no packed entry."""
    checkpoint = torch.load(fit.checkpoint, weights_only=True)
    entry = checkpoint[CHECKPOINT_KEY]
    del entry[PACKED_KEY]
    entry["format"] = "lightning_compress.checkpoint/1"
    checkpoint["state_dict"] = fit.model.state_dict()
    path = tmp_path / "compressed_v1.ckpt"
    torch.save(checkpoint, path)
    expected = _logits(fit.model, fit.data)
    assert torch.equal(_logits(load_compressed(_mlp(), path), fit.data), expected)
    model = _mlp()
    quiet_trainer(SETUPS["int8"]()).test(model, fit.data, ckpt_path=str(path), verbose=False)
    assert torch.equal(_logits(model, fit.data), expected)


def test_a_model_only_pruned_is_stored_as_its_compacted_float_weights(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model, data = _mlp(), DigitsDataModule(batch_size=64)
    trainer = quiet_trainer([_structured()], max_epochs=1, limit_train_batches=15)
    trainer.fit(model, data)
    path = Path(report_of(trainer).files["compressed_checkpoint"])
    checkpoint = torch.load(path, weights_only=True)
    assert "optimizer_states" not in checkpoint and "callbacks" not in checkpoint  # no pruning statistics either
    compacted = sum(value.numel() for value in model.state_dict().values())
    assert compacted < 0.8 * sum(value.numel() for value in _mlp().state_dict().values())
    assert os.path.getsize(path) < 4 * compacted * 1.1  # float32 weights of the compacted model, little more
    loaded = load_compressed(_mlp(), path)
    assert carried(loaded) is None and loaded.net[1].weight.shape == model.net[1].weight.shape
    assert torch.equal(_logits(loaded, data), _logits(model, data))


def test_pack_and_unpack_a_quantized_bert_without_a_trainer() -> None:
    """Embeddings, attention and FFN codes of a Hugging Face BERT go through the packed entry and back unchanged."""
    transformers = pytest.importorskip("transformers")
    from lightning_compress import quantize
    from lightning_compress.integration.artifacts import prepare_for_checkpoint

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    model = transformers.BertModel(config).eval()
    fresh = copy.deepcopy(model)
    quantize(model, bits=8)
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [{}],
                  CHECKPOINT_KEY: checkpoint_entry("compressed")}
    pack(checkpoint, model)
    assert "optimizer_states" not in checkpoint
    fresh.load_state_dict(prepare_for_checkpoint(fresh, checkpoint, source="bert.ckpt"), strict=True)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        assert torch.equal(fresh(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state, expected)
    assert set(carried(fresh).codes) == set(carried(model).codes) >= {"embeddings.word_embeddings.weight"}


def test_a_weight_edited_after_the_fit_is_saved_as_the_float_it_is(fit: Fit, tmp_path: Path) -> None:
    model = copy.deepcopy(fit.model)
    with torch.no_grad():
        model.net[1].weight[0, 0] += 0.123
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  CHECKPOINT_KEY: checkpoint_entry("compressed")}
    with pytest.warns(UserWarning, match=r"'net.1.weight'.*stores them as float"):
        pack(checkpoint, model)
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    loaded = load_compressed(_mlp(), path)
    assert "net.1.weight" not in carried(loaded).codes
    assert torch.equal(_logits(loaded, fit.data), _logits(model, fit.data))
