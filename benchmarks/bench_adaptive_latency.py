"""``compress(model, Budget(latency=...))`` on bench_resnet's ResNet-18-style CNN and MNIST-5k: structured units
chosen by the per-unit Fisher and a per-layer ONNX Runtime latency table, the model compacted, its latency measured.

1. One dense model is trained ``--epochs`` epochs (bench_resnet's model, data and schedule).
2. The latency table's predictions against measurements: plans solved for predicted targets ``--probe`` (fractions
   of the dense latency) are compacted and timed in ONNX Runtime in turns with the dense model; both predictors of
   :meth:`~lightning_compress.adaptive.latency.LatencyTable.predict` (``scaled`` and ``additive``) are compared.
3. ``compress()`` at ``--latency`` (default 0.5) with the defaults (no normalize / min_keep, no bound: the drop is
   reported), then with ``max_metric_drop=--max-drop`` points on the validation split (the bound decides); each
   twice, side by side on the same dense model and budget: float only (``search="sparsity"``: whole units removed)
   and int8 allowed (``search="joint"``: units and int8 layers, the int8 ones exported with static activations).
   Test accuracy before / after, measured latency ratio, MACs, the plan, the verification steps, wall seconds.
   The two unbounded deliveries are then timed again together with the dense model, in turns in one
   measurement (their ratio: int8 allowed / float only). Optionally ``--finetune`` epochs of the compacted model
   (same schedule as bench_resnet's arms) afterwards.
4. The callback path: ``AdaptiveCompression(budget=Budget(latency=...))`` in a fresh fit of the same model, data and
   ``--epochs`` (no normalize / min_keep, no bound): units pruned between ``--prune-from`` and ``--prune-to`` of the
   fit's steps, the rest of the fit recovers, compacted at the end; its latency re-timed here against the dense
   model (fresh ORT sessions, in turns) beside the callback's own measurement, and the test accuracy.

Every latency is ORT's (CPU, ``--threads`` intra-op threads, input ``(--batch, 1, side, side)``), median of runs
taken in turns, thread CPU time at one thread.

    python benchmarks/bench_adaptive_latency.py [--latency 0.5] [--batch 64] [--threads 1] [--epochs 3]
                                                [--max-drop 1.5] [--finetune 0] [--searches sparsity joint]
                                                [--no-callback] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_compress import AdaptiveCompression
from lightning_compress.adaptive import Budget, compress
from lightning_compress.adaptive.int8_latency import calibration_inputs, onnx_graph
from lightning_compress.adaptive.latency import float_graph, measure, measured_ratio
from lightning_compress.adaptive.latency_budget import LatencyBudgetError, deliver, problem_of
from lightning_compress.quantization.calibration import feed
from lightning_compress.quantization.carried import carried
from lightning_compress.structure.macs import macs_per_example

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy, fit, start_run
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json
from bench_resnet import ResNet18, fork


def probe_predictions(dense: torch.nn.Module, batches: list[Any], shape: tuple[int, ...], threads: int,
                      targets: list[float]) -> list[dict[str, float]]:
    """Plans solved for each predicted target, compacted and measured: predicted (both forms) vs measured."""
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    problem = problem_of(dense, example, shape, threads, batches, feed, None)
    rows = []
    for target in targets:
        plan = problem.solve(target * problem.table.dense)
        delivered = deliver(dense, problem, plan, example, shape, threads)
        sizes = problem.sizes(plan)
        scaled = problem.table.predict(sizes, "scaled") / problem.table.dense
        additive = problem.table.predict(sizes, "additive") / problem.table.dense
        rows.append({"target": target, "measured": delivered.ratio, "predicted scaled": scaled,
                     "predicted additive": additive, "error scaled": scaled / delivered.ratio - 1,
                     "error additive": additive / delivered.ratio - 1})
        print(f"  target {target:.2f}: measured {delivered.ratio:.3f}, predicted scaled {scaled:.3f} / additive "
              f"{additive:.3f}", flush=True)
    return rows


def run_compress(dense: torch.nn.Module, data: Any, batches: list[Any], budget: Budget, max_drop: float | None,
                 shape: tuple[int, ...], search: str) -> dict[str, Any]:
    started, cpu = time.perf_counter(), time.thread_time()
    val = data.val_dataloader()
    try:
        result = compress(dense, budget, batches, metric_fn=lambda m: accuracy(m, val), max_metric_drop=max_drop,
                          search=search)
    except LatencyBudgetError as err:
        return {"refused": str(err), "smallest latency": err.smallest_latency,
                "seconds": time.perf_counter() - started}
    seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
    test = accuracy(result.model, data.test_dataloader())
    return {"latency (measured ratio)": result.latency, "test accuracy (%)": test,
            "val accuracy before / after (%)": [result.metric_before, result.metric_after],
            "MACs / image": macs_per_example(result.model, torch.zeros(shape)), "plan": result.plan,
            "int8 layers": [layer for row in result.plan for layer in row.get("int8", [])],
            "steps": result.steps, "evaluations": result.evaluations, "seconds": seconds,
            "thread CPU seconds": cpu, "model": result.model}


def side_by_side(dense: torch.nn.Module, models: dict[str, torch.nn.Module], batches: list[Any],
                 shape: tuple[int, ...], threads: int) -> dict[str, Any]:
    """The dense float graph and each delivered model's graph (``export_onnx`` with static activations when it
    carries int8 codes, else float) timed in turns in one measurement."""
    graphs = {"dense": float_graph(dense, shape)}
    for name, model in models.items():
        graphs[name] = onnx_graph(model, calibration_inputs(batches))[0] if carried(model) is not None else \
            float_graph(model, shape)
    seconds = measure(graphs, dict.fromkeys(graphs, shape), threads)
    return {"ms per run": {k: v * 1e3 for k, v in seconds.items()},
            "fraction of dense": {k: seconds[k] / seconds["dense"] for k in models}}


def run_callback(dense: torch.nn.Module, data: Any, budget: Budget, args: argparse.Namespace,
                 shape: tuple[int, ...]) -> dict[str, Any]:
    """A fresh model fitted ``args.epochs`` epochs with ``AdaptiveCompression(budget)``; its latency re-timed against
    ``dense`` here, its test accuracy."""
    torch.manual_seed(0)
    model = ResNet18(args.width, args.image_size, args.lr)
    data.setup("fit")
    total = args.epochs * len(data.train_dataloader())
    start, end = int(args.prune_from * total), int(args.prune_to * total)
    callback = AdaptiveCompression(budget=budget, schedule_unit="step", start_step=start, end_step=end,
                                   frequency=max(1, (end - start) // 8), verbose=0)
    cpu = time.thread_time()
    try:
        seconds = fit(model, data, args.epochs, callbacks=[callback])
    except LatencyBudgetError as err:
        return {"refused": str(err), "smallest latency": err.smallest_latency}
    entry = callback.report.gate["adaptive"]
    retimed, _, _ = measured_ratio(dense, model.eval(), shape, args.threads)
    return {"latency (callback measured)": entry["delivered"]["latency"], "latency (re-timed here)": retimed,
            "test accuracy (%)": accuracy(model, data.test_dataloader()),
            "kept units": entry["delivered"]["kept_units"],
            "MACs / image": macs_per_example(model, torch.zeros(shape)), "steps": entry["verification_steps"],
            "pruning steps": [start, end], "fit seconds": seconds, "thread CPU seconds": time.thread_time() - cpu}


def dense_model(args: argparse.Namespace, data: Any) -> ResNet18:
    """The dense ResNet-18-style model (``--width``, ``--image-size``, ``--lr``) from the current random state: its
    weights read from ``--dense-cache`` when that file exists, else fitted for ``--epochs`` (and cached there)."""
    dense = ResNet18(args.width, args.image_size, args.lr)
    if args.dense_cache is not None and args.dense_cache.exists():
        dense.load_state_dict(torch.load(args.dense_cache))
    else:
        fit(dense, data, args.epochs)
        if args.dense_cache is not None:
            torch.save(dense.state_dict(), args.dense_cache)
    return dense


def dense_arguments(parser: argparse.ArgumentParser, width: int) -> None:
    """The options :func:`dense_model` reads (``--width`` defaults to ``width`` through ``start_run``)."""
    parser.add_argument("--width", type=int, default=None, help=f"channels of the first stage (default {width})")
    parser.add_argument("--image-size", type=int, default=None, choices=(7, 14, 28), help="input side (default 28)")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs (default 3)")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the dense fit")
    parser.add_argument("--dense-cache", type=Path, default=None, help="reuse / write the trained dense weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    dense_arguments(parser, 32)
    parser.add_argument("--latency", type=float, default=0.5, help="the budget: fraction of the dense latency")
    parser.add_argument("--batch", type=int, default=64, help="batch of the latency input")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads for training and the Fisher")
    parser.add_argument("--max-drop", type=float, default=1.5, help="bound of the second run (points, validation)")
    parser.add_argument("--probe", type=float, nargs="*", default=[0.35, 0.5, 0.65, 0.8],
                        help="predicted targets whose plans are measured against the prediction")
    parser.add_argument("--finetune", type=int, default=0, help="epochs fine-tuning the compacted model after")
    parser.add_argument("--prune-from", type=float, default=0.15, help="callback path: first event, share of the fit")
    parser.add_argument("--prune-to", type=float, default=0.6, help="callback path: last event, share of the fit")
    parser.add_argument("--searches", nargs="+", default=["sparsity", "joint"], choices=("sparsity", "joint"),
                        help="compress() arms of 3.: float only (sparsity), int8 allowed (joint)")
    parser.add_argument("--no-callback", action="store_true", help="skip the callback path (4.)")
    parser.add_argument("--quick", action="store_true", help="width 8, 14x14, 1 epoch (smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS / "adaptive_latency.json", help="where the figures go")
    args = parser.parse_args()
    capability = start_run(args, {"width": (32, 8), "image_size": (28, 14), "epochs": (3, 1)})
    load = os.getloadavg()
    print(f"CPU capability {capability}, load average {load}", flush=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    data = PreloadedMNIST5k(batch_size=64, seed=0)
    dense = dense_model(args, data)
    dense.eval()
    dense_accuracy = accuracy(dense, data.test_dataloader())
    print(f"dense: {dense_accuracy:.2f} % test accuracy", flush=True)
    batches = [b for _, b in zip(range(8), data.train_dataloader())]
    shape = (args.batch, 1, 28, 28)
    print("latency table predictions vs measured (fractions of the dense latency):", flush=True)
    probes = probe_predictions(dense, batches, shape, args.threads, args.probe)
    runs: dict[str, dict[str, Any]] = {}
    budget = Budget(latency=args.latency, latency_input=shape, threads=args.threads)
    arms = [(f"{kind}, {bound_name}", bound, search) for bound_name, bound in
            (("no bound", None), (f"bound {args.max_drop} points", args.max_drop))
            for kind, search in (("float only", "sparsity"), ("int8 allowed", "joint")) if search in args.searches]
    for name, bound, search in arms:
        runs[name] = run_compress(dense, data, batches, budget, bound, shape, search)
        row = runs[name]
        if "refused" in row:
            print(f"{name}: refused: {row['refused'][:400]}", flush=True)
            continue
        row["accuracy drop (points)"] = dense_accuracy - row["test accuracy (%)"]
        print(f"{name}: latency {row['latency (measured ratio)']:.3f}x, test {row['test accuracy (%)']:.2f} % "
              f"(drop {row['accuracy drop (points)']:.2f}), {row['seconds']:.0f} s; plan "
              f"{' '.join(p['label'] for p in row['plan'])}", flush=True)
        if args.finetune:
            model = fork(row["model"], args.lr / 5)
            fit(model, data, args.finetune)
            row["test accuracy after fine-tuning (%)"] = accuracy(model, data.test_dataloader())
            print(f"  after {args.finetune} epoch(s) fine-tuning: {row['test accuracy after fine-tuning (%)']:.2f} %",
                  flush=True)
    delivered = {name: runs[name]["model"] for name in ("float only, no bound", "int8 allowed, no bound")
                 if "model" in runs.get(name, {})}
    together = side_by_side(dense, delivered, batches, shape, args.threads) if len(delivered) == 2 else {}
    if together:
        fractions = together["fraction of dense"]
        together["int8 allowed / float only"] = fractions["int8 allowed, no bound"] / fractions["float only, no bound"]
        print(f"timed together: {', '.join(f'{k} {v:.3f}x' for k, v in fractions.items())}; int8 allowed / float "
              f"only {together['int8 allowed / float only']:.3f}", flush=True)
    for row in runs.values():
        row.pop("model", None)
    row = run_callback(dense, data, budget, args, shape) if not args.no_callback else {"refused": "not run"}
    runs["callback (AdaptiveCompression, no bound)"] = row
    if "refused" in row:
        print(f"callback: refused: {row['refused'][:400]}", flush=True)
    else:
        row["accuracy drop (points)"] = dense_accuracy - row["test accuracy (%)"]
        print(f"callback: latency {row['latency (callback measured)']:.3f}x (re-timed "
              f"{row['latency (re-timed here)']:.3f}x), test {row['test accuracy (%)']:.2f} % (drop "
              f"{row['accuracy drop (points)']:.2f}), fit {row['fit seconds']:.0f} s", flush=True)
    print(f"CPU capability: {capability}; load average at the end {os.getloadavg()}; total "
          f"{time.perf_counter() - started:.0f} s")
    write_json(args.json, dict(
        benchmark="adaptive_latency", machine=machine_info(args.quick), cpu_capability=capability,
        load_average=[load, os.getloadavg()],
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        dense={"test accuracy (%)": dense_accuracy}, predictions=probes, runs=runs, timed_together=together,
        seconds=time.perf_counter() - started,
    ))


if __name__ == "__main__":
    main()
