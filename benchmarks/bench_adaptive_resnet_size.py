"""``compress(model, Budget(size=...))`` on a trained ResNet-18-style CNN of any width (bench_resnet's model, MNIST-5k)
against the best uniform configuration that fits, at a few chosen fractions of the fp32 file.

bench_adaptive.py runs the same comparison along the uniform frontier, on a ResNet it trains itself (two seeds, a
reduced width by default). This one takes bench_adaptive_latency's dense model (``--width``, ``--image-size``,
``--epochs``; ``--dense-cache`` reuses its weights, so the same dense model serves the latency benches) and tries
only ``--sizes``, so that a full-width ResNet-18 (``--width 64``) fits in one run on a 2-core box:

1. bench_adaptive's uniform grid (sparsity 0 / 50 % x int2-int8 x per channel / g32, round to nearest with MSE
   clipping, written as ``compress()`` writes its plans): each configuration's file and test accuracy.
2. At each size: the best uniform configuration whose file fits, and ``compress()`` with each ``--searches``
   (bench_adaptive's arms: ``joint`` gets validation accuracy as ``metric_fn``, no bound), and ``joint`` with the
   bound (3.). Test accuracy (a split no arm sees), bytes on disk, the verification evaluations, thread CPU
   seconds of each call, the plan.
3. At each size, ``joint`` once more with bench_adaptive's bound (``max_metric_drop`` of 1 point of validation
   accuracy): delivered within it, or refused with the smallest budget that met it.

    python benchmarks/bench_adaptive_resnet_size.py [--width 64] [--image-size 28] [--epochs 3] [--sizes 0.15 0.1]
                                                    [--searches joint] [--dense-cache PATH] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lightning_compress.adaptive.frontier import best_within

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy, start_run
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json
from bench_adaptive import BOUND_POINTS, SEARCHES, adaptive, cnn_job, uniform_grid
from bench_adaptive_latency import dense_arguments, dense_model

GRID = {"sparsity": (0.0, 0.5), "bits": (2, 3, 4, 6, 8), "granularity": ("per_channel", "per_group")}
QUICK_GRID = {"sparsity": (0.0,), "bits": (2, 3, 4, 8), "granularity": ("per_channel", "per_group")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    dense_arguments(parser, 64)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.15, 0.10], help="budgets: fractions of fp32")
    parser.add_argument("--searches", nargs="+", default=["joint"], choices=SEARCHES,
                        help="compress(search=...) arms without a bound")
    parser.add_argument("--quick", action="store_true", help="width 8, 14x14, 1 epoch, a reduced grid (smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS / "adaptive_resnet_full_size.json")
    parser.set_defaults(train_threads=1)
    args = parser.parse_args()
    capability = start_run(args, {"width": (64, 8), "image_size": (28, 14), "epochs": (3, 1)})
    load = os.getloadavg()
    print(f"CPU capability {capability}, load average {load}", flush=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    data = PreloadedMNIST5k(batch_size=64, seed=0)
    dense = dense_model(args, data)
    grid = QUICK_GRID if args.quick else GRID
    job = cnn_job(f"ResNet-18 w{args.width} {args.image_size}px", dense, data, (float("nan"), float("nan")), grid,
                  calibration_batches=8)
    dense_test = job.metric(job.fresh())
    dense_val = accuracy(dense, data.val_dataloader())
    print(f"dense: test {dense_test:.2f} %, validation {dense_val:.2f} %, fp32 file {job.float_bytes} B", flush=True)
    clock = time.thread_time()
    uniform = uniform_grid(job)
    uniform_cpu = time.thread_time() - clock
    rows = []
    for fraction in args.sizes:
        cap = int(fraction * job.float_bytes)
        best = best_within(uniform, cap)
        row: dict[str, Any] = {"budget": cap, "budget_x": fraction, "uniform": best}
        arms = [(search, search, False) for search in args.searches] + [("joint_bounded", "joint", True)]
        for name, search, bounded in arms:
            row[name] = arm = adaptive(job, cap, search, bounded=bounded)
            if "metric" in arm:
                arm["drop (points)"] = dense_test - arm["metric"]
            print(f"  {fraction:.3f}x ({cap} B): uniform "
                  + (f"{best['config']} {best['metric']:.2f} % ({best['bytes']} B)" if best else "none fits")
                  + f" | {name}: " + (f"{arm['metric']:.2f} % ({arm['bytes']} B, {arm['evaluations']} evaluations, "
                                      f"{arm['cpu_s']:.0f} s CPU) {dict(Counter(arm['plan']))}" if "metric" in arm
                                      else f"refused: {arm['refused'][:300]}"), flush=True)
            write_json(args.json, dict(
                benchmark="adaptive_resnet_size", machine=machine_info(args.quick), cpu_capability=capability,
                load_average=[load, os.getloadavg()],
                settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                dense={"test accuracy (%)": dense_test, "validation accuracy (%)": dense_val,
                       "fp32 file bytes": job.float_bytes}, uniform_grid=uniform, uniform_grid_cpu_s=uniform_cpu,
                bound_points=BOUND_POINTS, rows=[*rows, row], seconds=time.perf_counter() - started))  # after every arm
        rows.append(row)
    print(f"CPU capability: {capability}; load average at the end {os.getloadavg()}; total "
          f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
