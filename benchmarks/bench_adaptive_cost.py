"""What ``AdaptiveCompression`` costs in a fit (issue 23, "Cost"), side by side in one process.

    python benchmarks/bench_adaptive_cost.py [--epochs 3] [--rounds 2] [--json PATH]

The built-in job (SmallCNN on MNIST-5k, batch 64, one torch thread, no validation) with ``Budget(size=0.15,
macs=0.5)``, fitted in turns: plain; ``every_row``: the callback as it was before (each event planned on every row
of every layer, the knapsack at ``compress()``'s 4096 buckets, round to nearest at the end); ``sampled``: the
defaults (large layers scored on sampled rows, 1024 buckets, GPTQ at the end where measured no worse). Per fit:
thread CPU seconds of the whole ``Trainer.fit``, of the planning at the events (the candidates' scores and the
knapsack) and of the end-of-fit ``compress()``; the plan of every event, the delivered widths, file and test
accuracy, so that the decisions can be compared, not only their cost.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.in_fit import SparsityPlanner
from lightning_compress.adaptive.knapsack import BUCKETS
from lightning_compress.callbacks.adaptive import AdaptiveCompression
from lightning_compress.demos.models import SmallCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json

BUDGET = Budget(size=0.15, macs=0.5)


class Timed(AdaptiveCompression):
    """The callback with its planner's and its ``compress()``'s thread CPU time recorded (and, with ``every_row``,
    the planner of every row)."""

    def __init__(self, every_row: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every_row, self.plan_s, self.compress_s, self.plans = every_row, 0.0, 0.0, []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        planner = self.run.planner
        assert isinstance(planner, SparsityPlanner)
        if self.every_row:
            planner.elements, planner.buckets = None, BUCKETS

        def timed(fisher: Any) -> dict[str, float]:
            clock = time.thread_time()
            plan = SparsityPlanner.__call__(planner, fisher)
            self.plan_s += time.thread_time() - clock
            self.plans.append({n: round(s, 4) for n, s in plan.items()})
            return plan
        self.run.planner = timed

    def _compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        clock = time.thread_time()
        result = super()._compress(trainer, pl_module)
        self.compress_s += time.thread_time() - clock
        return result


def one_fit(data: PreloadedMNIST5k, epochs: int, arm: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = SmallCNN()
    callback = None if arm == "plain" else Timed(arm == "every_row", budget=BUDGET, verbose=0,
                                                 method="rtn" if arm == "every_row" else "gptq")
    clock = time.thread_time()
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               default_root_dir=tempfile.mkdtemp(prefix="lc-bench-"), enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
               callbacks=[callback] if callback else []).fit(model, datamodule=data)
    out: dict[str, Any] = {"fit_cpu_s": time.thread_time() - clock,
                           "test_accuracy": accuracy(model, data.test_dataloader())}
    if callback is not None and callback.result is not None:
        out.update(plan_s=callback.plan_s, compress_s=callback.compress_s, events=len(callback.plans),
                   plans=callback.plans, file_bytes=callback.result.file_bytes, macs=callback.result.macs,
                   widths={r["layer"]: r["label"] for r in callback.result.plan}, method=callback.result.method)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "adaptive_cost.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    load = Path("/proc/loadavg").read_text().strip()
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; load average {load}")
    data = PreloadedMNIST5k(batch_size=64)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "every_row": [], "sampled": []}
    for _ in range(args.rounds):
        for arm, results in runs.items():
            results.append(one_fit(data, args.epochs, arm))
            r = results[-1]
            extra = "" if arm == "plain" else (f", planning {r['plan_s']:.2f} s at {r['events']} events, compress() "
                                               f"{r['compress_s']:.2f} s, file {r['file_bytes']} B")
            print(f"{arm}: fit {r['fit_cpu_s']:.2f} s thread CPU, test {r['test_accuracy']:.2f} %{extra}", flush=True)
    plain = min(r["fit_cpu_s"] for r in runs["plain"])
    for arm in ("every_row", "sampled"):
        best = min(runs[arm], key=lambda r: r["plan_s"])
        print(f"{arm}: planning {best['plan_s']:.2f} s = {100 * best['plan_s'] / plain:.1f} % of the plain fit "
              f"({plain:.2f} s); with compress() {100 * (best['plan_s'] + best['compress_s']) / plain:.1f} %")
    same = runs["every_row"][0]["plans"] == runs["sampled"][0]["plans"]
    print(f"the same plan at every event: {same}; widths every row {runs['every_row'][0]['widths']}, sampled "
          f"{runs['sampled'][0]['widths']}")
    print(f"load average after: {Path('/proc/loadavg').read_text()}")
    write_json(args.json, {"machine": machine_info(), "budget": repr(BUDGET), "epochs": args.epochs, "runs": runs,
                           "same_plans": same})


if __name__ == "__main__":
    main()
