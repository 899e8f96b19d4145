"""AdaptiveCompression end to end on a transformer this project did not write: a Hugging Face
``BertForSequenceClassification`` (small config, no download) taking token ids and an attention mask, trained in a
real ``Trainer.fit`` on scikit-learn's digits read as token sequences (each row of 8 pixels, thresholded, is one
token id; a [CLS] id first). The whole path: the fit with a size budget and a bound -> the ``.safetensors`` on disk
within the budget -> ``compressed.ckpt`` -> ``load_compressed`` into a freshly built model (the same logits) ->
``export_onnx`` with ``input_ids`` / ``attention_mask`` -> ONNX Runtime's outputs close to the in-memory compressed
model's at sizes the example did not have, embeddings on a ``Gather`` of their codes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_compress import AdaptiveCompression, Budget, export_onnx, load_compressed, load_quantized
from lightning_compress.core.accounting import state_bytes
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.quantization.carried import carried
from lightning_compress.serving._runtime import relative_error
from tests.callbacks.test_adaptive import FloatAtEnd

transformers = pytest.importorskip("transformers")  # the `test` extra installs it (.ci/run)
ort = pytest.importorskip("onnxruntime")

ROW_VOCAB = 2**8  # a row of 8 binary pixels
CLS = 0
BUDGET = Budget(size=0.2)
BOUND = 0.05  # accuracy points quantization may lose on validation
SLACK = 0.03  # the test split holds ~270 digits: a few may differ from validation
EPOCHS = 8


def digit_tokens(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of (B, 1, 8, 8) digits in [0, 1]: [CLS] then one id per row, # (B, 9)."""
    rows = (images.reshape(images.shape[0], 8, 8) > 0.4).long()  # (B, 8, 8)
    ids = (rows * (2 ** torch.arange(8))).sum(-1) + 1  # (B, 8), 1..256
    ids = torch.cat([torch.full((ids.shape[0], 1), CLS), ids], dim=1)
    return ids, torch.ones_like(ids)


class DigitBert(pl.LightningModule):
    """A 2-layer BERT classifier; ``forward`` takes token ids and a mask, as a serving caller gives them."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=ROW_VOCAB + 1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=16, num_labels=10, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="eager",
        )
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    def compression_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self(*digit_tokens(batch[0])), batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.compression_step(batch)[0], batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        preds, target = self.compression_step(batch)
        self.log("val_acc", (preds.argmax(-1) == target).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _test_split() -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataModule(batch_size=1000)
    data.setup("test")
    images, labels = next(iter(data.test_dataloader()))
    return images, labels


@torch.no_grad()
def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(*digit_tokens(images)).argmax(-1) == labels).float().mean())


def _padded(images: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with every other sequence padded after ``keep`` tokens (mask 0, pad id 0)."""
    ids, mask = digit_tokens(images)
    mask[::2, keep:] = 0
    ids[::2, keep:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adaptive_bert")
    pl.seed_everything(0)
    spy = FloatAtEnd()
    callback = AdaptiveCompression(budget=BUDGET, max_metric_drop=BOUND, export_path="model.safetensors")
    model = DigitBert()
    trainer = pl.Trainer(callbacks=[spy, callback], max_epochs=EPOCHS, accelerator="cpu", devices=1,
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
                         deterministic=True)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return {"root": root, "callback": callback, "model": model.eval(), "float": spy.state}


@pytest.mark.slow
def test_the_delivered_file_on_disk_is_within_the_size_budget(fitted: dict[str, Any]) -> None:
    callback = fitted["callback"]
    cap = math.floor(float(BUDGET.size) * sum(state_bytes(DigitBert()).values()))  # the budget from its definition
    export = Path(callback.report.files["quantized"])
    assert export.stat().st_size <= cap
    assert callback.result.file_bytes == export.stat().st_size == callback.report.gate["adaptive"]["delivered"][
        "file_bytes"]
    embeddings = {row["layer"]: row["bits"] for row in callback.result.plan if "embeddings" in row["layer"]}
    assert embeddings["bert.bert.embeddings.word_embeddings"] <= 8  # embeddings are quantized, as quantize() does
    assert {k for k in carried(fitted["model"]).codes if "word_embeddings" in k}


@pytest.mark.slow
def test_the_report_draws_every_plan_the_verification_measured(fitted: dict[str, Any]) -> None:
    report = fitted["callback"].report
    tried = report.gate["adaptive"]["tried"]
    assert tried and all(p["bytes"] is not None and p["metric"] is not None for p in tried)
    assert any(p["accepted"] and p["bytes"] <= report.gate["adaptive"]["budget"]["bytes"] for p in tried)
    svg = Path(report.files["report_plot"]).read_text()
    assert svg.count("<title>") == len(tried)  # one point per plan measured
    assert "budget frontier: " in Path(report.files["report_markdown"]).read_text()


@pytest.mark.slow
def test_the_bound_holds_on_the_test_split_the_gate_never_saw(fitted: dict[str, Any]) -> None:
    callback = fitted["callback"]
    images, labels = _test_split()
    float_model = DigitBert()
    float_model.load_state_dict(fitted["float"])
    delivered = load_quantized(DigitBert(), callback.report.files["quantized"])
    float_accuracy = _accuracy(float_model, images, labels)
    assert float_accuracy >= 0.6  # the model learned the task: the bound below is measured on a real classifier
    assert callback.report.metric_before - callback.report.metric_after <= BOUND  # validation: what the gate saw
    assert float_accuracy - _accuracy(delivered, images, labels) <= BOUND + SLACK


@pytest.mark.slow
def test_compressed_ckpt_loads_into_a_fresh_model_with_the_delivered_logits(fitted: dict[str, Any]) -> None:
    images, _ = _test_split()
    ids, mask = _padded(images[:64], keep=5)
    restored = load_compressed(DigitBert(), fitted["callback"].report.files["compressed_checkpoint"]).eval()
    with torch.no_grad():
        assert torch.equal(restored(ids, mask), fitted["model"](ids, mask))
    assert carried(restored) is not None  # it carries its codes: export_onnx needs no `result`


@pytest.mark.slow
def test_onnx_runtime_runs_the_reloaded_model_close_to_the_in_memory_compressed_one(
        fitted: dict[str, Any], tmp_path: Path) -> None:
    images, labels = _test_split()
    restored = load_compressed(DigitBert(), fitted["callback"].report.files["compressed_checkpoint"]).eval()
    example = dict(zip(("input_ids", "attention_mask"), _padded(images[:4], keep=6)))
    report = export_onnx(restored, tmp_path / "bert.onnx", example)
    embedding = report.layers["bert.bert.embeddings.word_embeddings"]
    assert embedding.op == embedding.runtime_op == "Gather"  # the int8 table: only the looked-up rows dequantized
    assert not report.not_integer, report.not_integer
    session = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    for batch, keep in ((len(images), 7), (3, 9)):  # neither the example's batch nor, once padded, its length
        ids, mask = _padded(images[:batch], keep=keep)
        ids, mask = ids[:, :keep + 1], mask[:, :keep + 1]  # sequences one token longer than the kept ones
        with torch.no_grad():
            want = fitted["model"](ids, mask).numpy()
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert got.shape == want.shape
        assert relative_error(want, got) < 0.05
        assert float(np.mean(got.argmax(1) == want.argmax(1))) >= 0.97
    ids, mask = digit_tokens(images)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert abs(float(np.mean(got.argmax(1) == labels.numpy())) - _accuracy(fitted["model"], images, labels)) <= 0.02
