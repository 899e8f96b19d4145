"""``AdaptiveCompression(budget=Budget(latency=...), max_metric_drop=...)`` in a fit of bench_resnet's ResNet-18-style
CNN on MNIST-5k: does it deliver within both the latency budget and the bound?

Whole units are pruned between ``--prune-from`` and ``--prune-to`` of the fit's steps (8 events); each event is held
and judged after recovery (adaptive/recovery_gate.py): by the validation metric before the next event, the last one
at the end of the fit; an event outside the bound then is undone and its families capped. The delivered (compacted)
model is verified against the bound on the validation data and timed in ONNX Runtime before it is exported.

Printed and written: the callback's latency and metric, the latency re-timed here against a dense model of the same
architecture (fresh ORT sessions, in turns), the test accuracy beside the dense model's (a dense fit of the same
epochs, or ``--dense-cache``), what the gate did at each event, wall and thread CPU seconds, the CPU capability and
the load average.

    python benchmarks/bench_adaptive_latency_gate.py [--latency 0.5] [--max-drop 0.015] [--epochs 3] [--width 32]
                                                     [--image-size 28] [--quick] [--dense-cache PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_compress import AdaptiveCompression, Budget
from lightning_compress.adaptive.latency import measured_ratio
from lightning_compress.adaptive.session import BudgetError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy, start_run
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json
from bench_adaptive_latency import dense_arguments, dense_model
from bench_resnet import ResNet18


def gated_fit(args: argparse.Namespace, data: Any, shape: tuple[int, ...]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fresh model fitted with the callback (validation every epoch: the gate's metric)."""
    torch.manual_seed(0)
    model = ResNet18(args.width, args.image_size, args.lr)
    data.setup("fit")
    total = args.epochs * len(data.train_dataloader())
    start, end = int(args.prune_from * total), int(args.prune_to * total)
    callback = AdaptiveCompression(budget=Budget(latency=args.latency, latency_input=shape, threads=args.threads),
                                   max_metric_drop=args.max_drop, schedule_unit="step", start_step=start,
                                   end_step=end, frequency=max(1, (end - start) // 8), verbose=1)
    started, cpu = time.perf_counter(), time.thread_time()
    row: dict[str, Any] = {"pruning steps": [start, end]}
    try:
        pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   default_root_dir=tempfile.mkdtemp(prefix="lc-bench-"), enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback]
                   ).fit(model, datamodule=data)
    except BudgetError as err:
        row["refused"] = str(err)
    entry = callback.report.gate.get("adaptive", {})
    row.update({"fit seconds": time.perf_counter() - started, "thread CPU seconds": time.thread_time() - cpu,
                "gate at each event": entry.get("recovery_gate"), "capped families": entry.get("capped_families"),
                "events": [{"step": h["step"], "accepted": h["accepted"], "metric before": h["metric_before"],
                            "metric after": h["metric_after"], "note": h["note"]} for h in callback.history],
                "metric before the first event": callback.controller.initial_metric,
                "delivered": entry.get("delivered"), "steps": entry.get("verification_steps")})
    return model, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    dense_arguments(parser, 32)  # the gated fit's model and epochs too
    parser.add_argument("--latency", type=float, default=0.5, help="the budget: fraction of the dense latency")
    parser.add_argument("--max-drop", type=float, default=0.015, help="the bound (accuracy as a fraction)")
    # bench_adaptive_latency's input, threads and pruning span (its callback row: the same fit, no bound)
    parser.set_defaults(batch=64, threads=1, train_threads=1, prune_from=0.15, prune_to=0.6)
    parser.add_argument("--quick", action="store_true", help="width 8, 14x14, 1 epoch (smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS / "adaptive_latency_gate.json")
    args = parser.parse_args()
    capability = start_run(args, {"width": (32, 8), "image_size": (28, 14), "epochs": (3, 1)})
    load = os.getloadavg()
    print(f"CPU capability {capability}, load average {load}", flush=True)
    data = PreloadedMNIST5k(batch_size=64, seed=0)
    shape = (args.batch, 1, args.image_size, args.image_size)
    torch.manual_seed(0)
    dense = dense_model(args, data)
    dense_test = accuracy(dense, data.test_dataloader())
    print(f"dense: {dense_test:.2f} % test accuracy", flush=True)
    model, row = gated_fit(args, data, shape)
    if "refused" not in row:
        row["latency (re-timed here)"] = measured_ratio(dense.eval(), model.eval(), shape, args.threads)[0]
        row["test accuracy (%)"] = accuracy(model, data.test_dataloader())
        row["test drop vs dense (points)"] = dense_test - row["test accuracy (%)"]
    for line in row["gate at each event"] or []:
        print(f"  gate: {line}", flush=True)
    print({k: v for k, v in row.items() if k not in ("events", "gate at each event", "steps")}, flush=True)
    print(f"CPU capability: {capability}; load average at the end {os.getloadavg()}", flush=True)
    write_json(args.json, dict(benchmark="adaptive_latency_gate", machine=machine_info(args.quick),
                               cpu_capability=capability, load_average=[load, os.getloadavg()],
                               settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               dense={"test accuracy (%)": dense_test}, run=row))


if __name__ == "__main__":
    main()
