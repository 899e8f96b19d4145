"""``AdaptiveCompression`` with and without ``QuantizationAwareTraining`` at the same budget (issue 22, "runs together
with AdaptiveCompression"), side by side in one process.

    python benchmarks/bench_adaptive_qat.py [--epochs 4] [--seeds 0 1] [--size 0.1] [--macs 0.5]
        [--pruning-end 2.5] [--qat-start 0.75] [--json PATH]

The built-in job (SmallCNN on MNIST-5k, batch 64, one torch thread), the same pruning schedule in both arms (events
from half of the first epoch to ``--pruning-end`` epochs); ``adaptive``: widths planned and quantized at the end of
the fit (GPTQ where measured no worse); ``adaptive+qat``: the same plan made when QAT starts (``--qat-start``, a
fraction of the fit) on the masks reached, trained by QAT, delivered as trained. The arms alternate within each
seed. Per fit: test accuracy (the split the bound never sees), the file on disk, the widths, thread CPU seconds of
the whole ``Trainer.fit``.
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

from lightning_compress import AdaptiveCompression, Budget, QuantizationAwareTraining
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.demos.models import SmallCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json

BOUND = 0.02  # validation accuracy the delivered model may lose against the metric before the first pruning event


def one_fit(data: PreloadedMNIST5k, budget: Budget, args: argparse.Namespace, seed: int, qat: bool) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN()
    steps = len(data.train_dataloader())
    adaptive = AdaptiveCompression(budget=budget, max_metric_drop=BOUND, export_path="model.safetensors", verbose=0,
                                   start_step=steps // 2, end_step=int(args.pruning_end * steps),
                                   frequency=max(1, steps // 4))
    callbacks: list[Any] = [adaptive] + ([QuantizationAwareTraining(start=args.qat_start)] if qat else [])
    clock = time.thread_time()
    out: dict[str, Any] = {"arm": "adaptive+qat" if qat else "adaptive", "seed": seed}
    try:
        pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   default_root_dir=tempfile.mkdtemp(prefix="lc-bench-"), enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks).fit(model, datamodule=data)
    except BudgetError as err:
        out.update(failed=str(err), fit_cpu_s=time.thread_time() - clock)
        return out
    result = adaptive.result
    assert result is not None
    out.update(fit_cpu_s=time.thread_time() - clock, test_accuracy=accuracy(model, data.test_dataloader()),
               file_bytes=Path(adaptive.report.files["quantized"]).stat().st_size, budget_bytes=result.budget_bytes,
               method=result.method, widths={r["layer"]: r["label"] for r in result.plan},
               validation_before=adaptive.controller.initial_metric, validation_after=result.metric_after,
               steps=result.steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--size", type=float, default=0.1)
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--pruning-end", type=float, default=2.5, help="the last pruning event, in epochs")
    parser.add_argument("--qat-start", type=float, default=0.75, help="QAT's start, a fraction of the fit")
    parser.add_argument("--json", type=Path, default=RESULTS / "adaptive_qat.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    budget = Budget(size=args.size, macs=args.macs)
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; load average "
          f"{Path('/proc/loadavg').read_text().strip()}")
    data = PreloadedMNIST5k(batch_size=64)
    runs = []
    for seed in args.seeds:
        for qat in ((False, True) if seed % 2 == 0 else (True, False)):  # alternate which arm runs first
            r = one_fit(data, budget, args, seed, qat)
            runs.append(r)
            shown = r.get("failed") or (f"test {r['test_accuracy']:.2f} %, file {r['file_bytes']} B of "
                                        f"{r['budget_bytes']}, {r['method']}, widths {r['widths']}")
            print(f"seed {seed} {r['arm']}: {shown}; fit {r['fit_cpu_s']:.1f} s thread CPU; load "
                  f"{Path('/proc/loadavg').read_text().split()[0]}", flush=True)
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    write_json(args.json, {"machine": machine_info(), "budget": repr(budget), "bound": BOUND, "epochs": args.epochs,
                           "pruning_end_epochs": args.pruning_end, "qat_start": args.qat_start, "runs": runs})


if __name__ == "__main__":
    main()
