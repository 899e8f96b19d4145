"""Prune and quantize under DDP with 2 CPU processes (no GPU needed).

    python examples/ddp_cpu.py                                # ~1 minute on 2 CPU cores
    python examples/ddp_cpu.py --max-epochs 1 --limit-batches 6   # a smoke run

Lightning starts the second process by re-running this script (hence the ``if __name__ == "__main__"`` guard).
Under DDP the gradients the pruning callback reads are already averaged over the ranks, the masks are broadcast
from rank 0 and the metric is synced, so every rank takes the same decisions; only rank 0 prints the report and
writes files. Data: scikit-learn's 8x8 digits (``pip install 'lightning-compress[data]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--limit-batches", type=float, default=1.0,
                        help="fraction (<= 1.0) or number (> 1) of train / val batches per rank")
    parser.add_argument("--out", default="runs/ddp_cpu_example")
    args = parser.parse_args()
    limit = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",  # "ddp_spawn" works too
        max_epochs=args.max_epochs,
        limit_train_batches=limit,
        limit_val_batches=limit,
        callbacks=[
            GradientStabilityPruning(sparsity=0.6, max_metric_drop=0.03),
            PostTrainingQuantization(bits=8, max_metric_drop=0.01, export_path="model.int8.safetensors"),
        ],
        default_root_dir=str(out),
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    model = MLPClassifier(input_size=64, hidden=[64, 32], lr=1e-2)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    if trainer.is_global_zero:
        print(f"rank 0 done; report in {trainer.loggers[0].log_dir}")


if __name__ == "__main__":
    main()
