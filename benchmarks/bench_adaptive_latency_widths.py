"""``compress(model, Budget(latency=..., size=...))`` on bench_resnet's ResNet-18-style CNN and MNIST-5k, where the
size is below the file of the dense model with every layer int8: the latency plan (units + int8) alone, as before
issue 23's widths (:func:`~lightning_compress.adaptive.latency_widths.plan_widths` stubbed to find nothing), beside
the same plan with the bytes left to narrower widths, one process, same dense model, budget and bound. Reports per
arm: refused (with the nearest budget) or the delivered latency ratio, file bytes on disk, MACs, test accuracy, the
plan's widths; then the delivered models timed again together with the dense one, in turns.

    python benchmarks/bench_adaptive_latency_widths.py [--latency 0.5] [--size 0.15] [--max-drop 1.5]
                                                       [--dense-cache PATH] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_compress.adaptive import Budget, compress, latency_budget
from lightning_compress.adaptive.costs import file_bytes
from lightning_compress.adaptive.int8_latency import quantize_int8
from lightning_compress.adaptive.latency import LAYER_TYPES
from lightning_compress.adaptive.latency_budget import LatencyBudgetError
from lightning_compress.core.accounting import state_bytes
from lightning_compress.structure.macs import macs_per_example

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy, start_run
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json
from bench_adaptive_latency import dense_arguments, dense_model, side_by_side


def arm(dense: torch.nn.Module, data: Any, batches: list[Any], budget: Budget, max_drop: float,
        widths: bool, path: Path) -> dict[str, Any]:
    real = latency_budget.plan_widths
    if not widths:
        latency_budget.plan_widths = lambda *args: None  # type: ignore[assignment]  # the path before the widths
    started, cpu = time.perf_counter(), time.thread_time()
    val = data.val_dataloader()
    try:
        result = compress(dense, budget, batches, metric_fn=lambda m: accuracy(m, val), max_metric_drop=max_drop)
    except LatencyBudgetError as err:
        return {"refused": str(err), "smallest latency": err.smallest_latency,
                "seconds": time.perf_counter() - started}
    finally:
        latency_budget.plan_widths = real  # type: ignore[assignment]
    seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
    on_disk = result.save(path).stat().st_size
    return {"latency (measured ratio)": result.latency, "file bytes (on disk)": on_disk,
            "budget bytes": result.budget_bytes, "test accuracy (%)": accuracy(result.model, data.test_dataloader()),
            "val accuracy before / after (%)": [result.metric_before, result.metric_after],
            "MACs / image": macs_per_example(result.model, torch.zeros(budget.latency_input or ())),
            "plan": [row["label"] for row in result.plan], "bits": {r["layer"]: r["bits"] for r in result.plan},
            "steps": result.steps, "evaluations": result.evaluations, "seconds": seconds,
            "thread CPU seconds": cpu, "model": result.model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    dense_arguments(parser, 32)
    parser.add_argument("--latency", type=float, default=0.5, help="the budget: fraction of the dense latency")
    parser.add_argument("--size", type=float, default=0.15, help="the budget: fraction of the fp32 file")
    parser.add_argument("--batch", type=int, default=64, help="batch of the latency input")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads for training and the Fisher")
    parser.add_argument("--max-drop", type=float, default=1.5, help="the bound (points, validation)")
    parser.add_argument("--quick", action="store_true", help="width 8, 14x14, 1 epoch (smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS / "adaptive_latency_widths.json")
    args = parser.parse_args()
    capability = start_run(args, {"width": (32, 8), "image_size": (28, 14), "epochs": (3, 1)})
    load = os.getloadavg()
    print(f"CPU capability {capability}, load average {load}", flush=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    data = PreloadedMNIST5k(batch_size=64, seed=0)
    dense = dense_model(args, data).eval()
    dense_accuracy = accuracy(dense, data.test_dataloader())
    every_int8 = copy.deepcopy(dense)
    quantize_int8(every_int8, [n for n, m in every_int8.named_modules() if isinstance(m, LAYER_TYPES)])
    fp32, int8_file = sum(state_bytes(dense).values()), file_bytes(every_int8)
    print(f"dense: {dense_accuracy:.2f} % test; fp32 tensors {fp32} B, every layer int8 {int8_file} B "
          f"({int8_file / fp32:.3f}x); budget size {args.size}", flush=True)
    batches = [b for _, b in zip(range(8), data.train_dataloader())]
    shape = (args.batch, 1, 28, 28)
    budget = Budget(latency=args.latency, size=args.size, latency_input=shape, threads=args.threads)
    runs: dict[str, dict[str, Any]] = {}
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    for name, widths in (("units + int8 (before)", False), ("units + int8 + widths (now)", True)):
        runs[name] = row = arm(dense, data, batches, budget, args.max_drop, widths, folder / f"widths_{widths}.st")
        if "refused" in row:
            print(f"{name}: refused ({row['seconds']:.0f} s): {row['refused'][:600]}", flush=True)
            continue
        row["accuracy drop (points)"] = dense_accuracy - row["test accuracy (%)"]
        print(f"{name}: latency {row['latency (measured ratio)']:.3f}x, file {row['file bytes (on disk)']} B "
              f"(cap {row['budget bytes']}), test {row['test accuracy (%)']:.2f} % (drop "
              f"{row['accuracy drop (points)']:.2f}), {row['seconds']:.0f} s; plan {' | '.join(row['plan'])}",
              flush=True)
    delivered = {name: row["model"] for name, row in runs.items() if "model" in row}
    together = side_by_side(dense, delivered, batches, shape, args.threads) if delivered else {}
    if together:
        print(f"timed together: {together['fraction of dense']}", flush=True)
    for row in runs.values():
        row.pop("model", None)
    print(f"CPU capability: {capability}; load average at the end {os.getloadavg()}; total "
          f"{time.perf_counter() - started:.0f} s")
    write_json(args.json, dict(
        benchmark="adaptive_latency_widths", machine=machine_info(args.quick), cpu_capability=capability,
        load_average=[load, os.getloadavg()],
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        dense={"test accuracy (%)": dense_accuracy, "fp32 tensor bytes": fp32, "every layer int8 file": int8_file},
        runs=runs, timed_together=together, seconds=time.perf_counter() - started,
    ))


if __name__ == "__main__":
    main()
