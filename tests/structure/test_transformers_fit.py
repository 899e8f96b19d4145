"""A Hugging Face BERT (small BertConfig, no download) fine-tuned in a Trainer with dict batches, pruned by heads and
FFN neurons with GradientStabilityPruning(structured=True, compact=True): the delivered model is smaller, runs,
computes what the masked model computed, and reloads."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_compress import GradientStabilityPruning
from lightning_compress.structure.compaction import count_parameters, load_compacted, save_compacted
from lightning_compress.structure.dependency import find_unit_groups
from tests.helpers import quiet_trainer

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 40, 10


class TokenTask(Dataset):
    """Label 1 when the sequence holds token 1 more often than token 2: attention has something to learn."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
        self.labels = ((self.ids == 1).sum(1) > (self.ids == 2).sum(1)).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def bert(num_labels: int = 2) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=LENGTH, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


class BertClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.bert = bert()
        self.example_input_array = torch.randint(0, VOCAB, (2, LENGTH))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).logits

    def compression_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch["input_ids"]), batch["labels"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        preds, targets = self.compression_step(batch)
        return F.cross_entropy(preds, targets)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        preds, targets = self.compression_step(batch)
        self.log("val_loss", F.cross_entropy(preds, targets))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TokenTask(256, seed=0), batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TokenTask(64, seed=1), batch_size=64)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class KeepMasked(pl.Callback):
    """Copies the masked model at the end of the last epoch: after the last pruning event, before compaction."""

    def __init__(self) -> None:
        self.masked: torch.nn.Module | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == trainer.max_epochs:
            self.masked = copy.deepcopy(pl_module.bert)


def test_bert_heads_and_ffn_pruned_and_compacted_in_a_trainer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = BertClassifier()
    params_before = count_parameters(model.bert)
    pruning = GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, evaluate=False, verbose=0)
    spy = KeepMasked()
    quiet_trainer([spy, pruning], max_epochs=3).fit(model)

    layer = model.bert.bert.encoder.layer[0]
    heads = [layer.attention.self.num_attention_heads for layer in model.bert.bert.encoder.layer]
    ffn = [layer.intermediate.dense.out_features for layer in model.bert.bert.encoder.layer]
    assert sum(heads) < 8 and all(h >= 1 for h in heads)  # heads removed, 4 per layer before
    assert sum(ffn) < 128  # FFN neurons removed, 64 per layer before
    assert layer.attention.self.all_head_size == layer.attention.self.query.out_features
    assert layer.attention.output.dense.in_features == layer.attention.self.value.out_features
    assert count_parameters(model.bert) < params_before

    ids = torch.randint(0, VOCAB, (8, LENGTH))
    with torch.no_grad():
        compacted = model.bert.eval()(input_ids=ids).logits
        masked = spy.masked.eval()(input_ids=ids).logits
    torch.testing.assert_close(compacted, masked, atol=1e-4, rtol=1e-4)

    path = tmp_path / "bert.safetensors"
    save_compacted(model.bert, path)
    fresh = load_compacted(bert(), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, compacted, atol=0, rtol=0)
    assert [layer.attention.self.num_attention_heads for layer in fresh.bert.encoder.layer] == heads
    groups = find_unit_groups(fresh, ids[:2])  # the reloaded model is analysable again
    assert groups["bert.encoder.layer.0.intermediate.dense"].prunable
