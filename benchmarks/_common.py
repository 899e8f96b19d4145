"""Shared benchmark pieces: the start of a run (defaults, threads, seed, header), a plain-torch training loop, a quiet
Lightning fit, test accuracy, the size of a model's safetensors file, and the LightningModule base of the structured
benchmarks' models."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_compress.quantization import save_quantized


def start_run(args: argparse.Namespace, defaults: Mapping[str, tuple[Any, Any]]) -> str:
    """Fill the arguments left ``None`` from ``defaults`` (name -> (full value, ``--quick`` value)), silence
    warnings, set ``args.train_threads``, seed 0, print the run's header; returns the CPU capability."""
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.train_threads)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU capability: {capability}; torch {torch.__version__}; {vars(args)}", flush=True)
    pl.seed_everything(0, verbose=False)
    return capability


def train(model: nn.Module, loader: Any, epochs: int, lr: float) -> nn.Module:
    """AdamW + one-cycle, plain torch (no Trainer): the float baselines of the quantization benchmarks."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


def fit(model: pl.LightningModule, data: pl.LightningDataModule, epochs: int, callbacks: list | None = None) -> float:
    """A quiet CPU ``Trainer.fit`` (no validation, logger or checkpoints); returns its seconds."""
    model.train()  # Lightning's fit keeps the mode it is given: a model left in eval mode by `accuracy` would
    # fine-tune with frozen BatchNorm statistics (and no dropout); the ResNet arms fell to chance that way
    started = time.perf_counter()
    pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        default_root_dir=tempfile.mkdtemp(prefix="lc-bench-"),  # the callbacks' reports go there
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks or [],
        num_sanity_val_steps=0,
    ).fit(model, datamodule=data)
    return time.perf_counter() - started


@torch.inference_mode()
def accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Percent of correct argmax predictions over ``loader``'s ``(inputs, targets)`` batches."""
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return 100.0 * hits / total


def file_size(model: nn.Module, result: Any = None) -> int:
    """Bytes of ``model`` written as safetensors: its float ``state_dict``, or with a quantization ``result`` the
    quantized export."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        if result is None:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        else:
            save_quantized(model, result, path)
        return os.path.getsize(path)


class BenchClassifier(pl.LightningModule):
    """Cross-entropy training, ``val_acc``, and a step-wise schedule: one-cycle from scratch, cosine without
    warm-up when fine-tuning (``finetuning=True``; a warm-up from a trained model shook it: accuracy fell to 12 %
    mid-way). Subclasses build the optimizer in :meth:`make_optimizer`."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr, self.finetuning = lr, False

    def make_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer()
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler: Any
        if self.finetuning:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        else:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.lr, total_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
