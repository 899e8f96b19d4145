"""Compress to a budget (``lightning_compress.compress``) against the baselines of issue 23, side by side in one run.

    python benchmarks/bench_adaptive.py [--quick] [--no-minilm] [--json PATH]

Jobs: SmallCNN on MNIST-5k (the built-in job: ``Trainer.fit``, 4 epochs), the ResNet-18-style CNN of
``bench_resnet.py`` on MNIST-5k (seeds 0 and 1 for both, or ``--seeds``) and all-MiniLM-L6-v2 (pretrained,
``bench_minilm``'s calibration texts and evaluation sentences of another domain; ``HF_HUB_OFFLINE=1``). Per job and
seed:

1. The uniform grid: every layer alike, sparsity (by ``F * w^2``, as the candidates prune) x bits x granularity
   (per channel where the group does not divide a layer's input), round to nearest with MSE clipping, written as
   ``compress()`` writes its plans (the same candidates); its file as ``save_quantized`` writes it, and the metric
   (test accuracy; MiniLM: min cosine to fp32 on the evaluation sentences).
2. Budgets: the sizes of the uniform configurations on the uniform frontier (none smaller and at least as good), at
   least four. At each, ``compress()`` with ``search="joint"`` (the default: no sparsity under a size budget alone),
   ``"all"`` (widths, granularity and sparsity priced in the sparse layout's bytes), ``"bits"`` (sparsity 0, as
   ModelOpt's ``auto_quantize``) and ``"sparsity"`` (every layer int8, sparsity chosen), no bound; ``"joint"`` gets
   the validation metric as ``metric_fn`` (it delivers the best measured of its plan and the uniform configurations
   that fit; never the test split), and runs once more without it (``joint_no_metric``: compared on the top-1 loss
   against the float model on the calibration batches; MiniLM has a ``loss_fn``, so only its plan). The baseline is
   the best uniform configuration whose file is at most the budget, i.e. of equal or larger size than adaptive's.
   CNN jobs also run the joint search with the bound (``max_metric_drop`` 1 point of validation accuracy) and report
   the verification evaluations and the test accuracy (an independent split).
3. Spearman rank correlation of predicted ``1/2 sum(F dW^2)`` vs measured validation-loss change, each candidate
   applied to its layer alone (CNN jobs; the ResNet's candidates subsampled per layer).
4. Cost on the built-in SmallCNN job (and the ResNet's): thread CPU seconds of the Fisher, the candidates' scores
   (as ``compress()`` makes them under a size budget, and with every sparsity as under a MACs cap) and the solve,
   against the process CPU seconds of the ``Trainer.fit`` (one thread), and of a whole ``compress()`` call.
5. The frontier plot (metric vs file size) is written next to the JSON (``adaptive_frontier.png``).

Verdict per job: adaptive at least as good as the best uniform at every seed and budget within the seed spread (the
difference between the seeds' float models' metric), and better by more than it at half or more. Beside that full
count, a second one over only the budgets where the best uniform loses more than the spread to its float model, and
with ``--between`` (budgets halfway between frontier sizes added) a third over the frontier's budgets alone. A
frontier budget is a uniform file's size to the byte, and ``compress()`` reserves a header margin, so it can never
pick that uniform plan itself there: it must do better with fewer bytes.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn

from lightning_compress import Budget, compress
from lightning_compress.adaptive import BudgetError
from lightning_compress.adaptive.candidates import SPARSITIES, layer_candidates, realise
from lightning_compress.adaptive.costs import aliases, file_bytes, fixed_bytes, positions
from lightning_compress.adaptive.fisher import diagonal_fisher
from lightning_compress.adaptive.frontier import best_within, budgets_along, frontier
from lightning_compress.adaptive.plan import Problem
from lightning_compress.adaptive.session import Session
from lightning_compress.core.gate import MetricGate
from lightning_compress.quantization.calibration import feed
from lightning_compress.quantization.carried import forget
from lightning_compress.quantization.checks import measure
from lightning_compress.quantization.coverage import QUANT_MODULE_TYPES, layer_weight, select_layers, weight_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy, file_size, fit
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json

SEARCHES = ("joint", "all", "bits", "sparsity")  # compress(search=...): "all" is the joint search with sparsity
NO_METRIC = "joint_no_metric"  # the default without metric_fn: plans compared on the calibration batches' top-1 loss
VERDICT_SEARCHES = ("joint", NO_METRIC, "all")  # judged against the best uniform
BOUND_POINTS = 1.0  # max_metric_drop of the bounded CNN runs, in validation-accuracy points


@dataclass
class Job:
    """One model to compress: ``fresh()`` gives the float model to work on (a copy, or the original restored)."""

    name: str
    fresh: Callable[[], nn.Module]
    calibration: list[Any]
    metric: Callable[[nn.Module], float]  # the reported metric, higher is better, on held-out data
    float_bytes: int
    group_size: int
    grid: dict[str, tuple[Any, ...]]
    loss_fn: Callable[[Any, Any], Tensor] | None = None
    val_metric: Callable[[nn.Module], float] | None = None  # the bound's metric (CNNs: validation accuracy %)
    val_loss: Callable[[nn.Module], float] | None = None  # for the Spearman
    extra_budgets: tuple[float, ...] = ()  # fractions of the fp32 file tried besides the uniform frontier's sizes
    most_budgets: int = 6  # frontier sizes tried at most
    fit_s: float | None = None  # wall seconds of the Trainer.fit
    fit_cpu_s: float | None = None  # its process CPU seconds (one thread, no loader workers)


# ---------------------------------------------------------------------------------------------- jobs
def _val_loss(loader: Any) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def loss(model: nn.Module) -> float:
        model.eval()
        total = count = 0.0
        for x, y in loader:
            total += float(F.cross_entropy(model(x), y, reduction="sum"))
            count += len(y)
        return total / count
    return loss


def cnn_job(name: str, model: nn.Module, data: PreloadedMNIST5k, fit_s: tuple[float, float],
            grid: dict[str, tuple[Any, ...]], calibration_batches: int) -> Job:
    model.eval()
    train = list(data.train_dataloader())[:calibration_batches]
    val, test = list(data.val_dataloader()), list(data.test_dataloader())
    return Job(name, lambda: copy.deepcopy(model), train, lambda m: accuracy(m, test), file_size(model), 32, grid,
               val_metric=lambda m: accuracy(m, val), val_loss=_val_loss(val), fit_s=fit_s[0], fit_cpu_s=fit_s[1])


def timed_fit(model: nn.Module, data: PreloadedMNIST5k, epochs: int) -> tuple[float, float]:
    """Wall and process CPU seconds of ``_common.fit``."""
    cpu = time.process_time()
    wall = fit(model, data, epochs)
    return wall, time.process_time() - cpu


def smallcnn_jobs(seeds: list[int], epochs: int, grid: dict[str, tuple[Any, ...]]) -> list[Job]:
    import lightning.pytorch as pl

    from lightning_compress.demos.models import SmallCNN

    data = PreloadedMNIST5k(batch_size=64)
    jobs = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        model = SmallCNN()
        fit_s = timed_fit(model, data, epochs)  # the built-in job (configs/prune.yaml's model, data and epochs)
        jobs.append(cnn_job(f"SmallCNN seed {seed}", model, data, fit_s, grid, calibration_batches=8))
    return jobs


def resnet_jobs(seeds: list[int], width: int, image_size: int, epochs: int,
                grid: dict[str, tuple[Any, ...]]) -> list[Job]:
    import lightning.pytorch as pl
    from bench_resnet import ResNet18

    data = PreloadedMNIST5k(batch_size=64)
    jobs = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        model = ResNet18(width, image_size)
        fit_s = timed_fit(model, data, epochs)
        jobs.append(cnn_job(f"ResNet-18 w{width} {image_size}px seed {seed}", model, data, fit_s, grid,
                            calibration_batches=8))
    return jobs


def minilm_job(grid: dict[str, tuple[Any, ...]], paragraphs: int, budgets: int) -> Job:
    import bench_minilm as mini

    st = mini.load_minilm()
    bert = st[0].auto_model
    float_state = copy.deepcopy(bert.state_dict())
    reference = mini.embed(st)
    generator = torch.Generator().manual_seed(0)

    def loss_fn(output: Any, batch: dict[str, Tensor]) -> Tensor:  # Gaussian Fisher of the token states
        states = output.last_hidden_state
        noise = torch.randn(states.shape, generator=generator)
        mask = batch["attention_mask"].unsqueeze(-1)
        return 0.5 * ((states - (states.detach() + noise)).square() * mask).sum() / states.shape[0]

    def fresh() -> nn.Module:
        forget(bert)
        bert.load_state_dict(float_state)
        return bert

    def metric(model: nn.Module) -> float:
        assert model is bert, "the MiniLM metric reads the sentence-transformer around the one BERT"
        return mini.compare(reference, mini.embed(st))["min_cos"]

    cal = mini.batches(st, list(mini.CALIBRATION_TEXTS) + mini.doc_paragraphs(paragraphs))
    return Job("all-MiniLM-L6-v2", fresh, cal, metric, file_size(bert), 128, grid, loss_fn=loss_fn,
               extra_budgets=(0.15,), most_budgets=budgets)


# ---------------------------------------------------------------------------------------------- uniform grid
def uniform_grid(job: Job) -> list[dict[str, Any]]:
    """Every configuration of the grid, each layer at that sparsity, width and granularity (per channel where the
    group size does not divide its input), quantized, written and measured as ``compress()`` writes its plans."""
    model = job.fresh()
    layers, _ = select_layers(model, QUANT_MODULE_TYPES)
    weights = {n: layer_weight(n, m) for n, m in layers.items()}
    keys = {n: weight_key(n, m) for n, m in layers.items()}
    fisher = diagonal_fisher(model, weights, job.calibration, feed, job.loss_fn)
    where = positions(model, layers, job.calibration[0], feed)
    candidates = {n: layer_candidates(n, layers[n], weights[n], fisher[n], where[n], count, "mse",
                                      widths=job.grid["bits"], sparsities=job.grid["sparsity"])
                  for n, count in aliases(model, keys).items()}
    floats = {n: w.detach().clone() for n, w in weights.items()}
    session = Session(model, layers, weights, keys, floats, fisher, where, "mse", None, measure, MetricGate(None),
                      None)
    rows = []
    for sparsity in job.grid["sparsity"]:
        for bits in job.grid["bits"]:
            for granularity in job.grid["granularity"]:
                plan = {}
                for name, options in candidates.items():
                    same = [c for c in options if c.sparsity == sparsity and c.bits == bits]
                    plan[name] = next((c for c in same if c.granularity == granularity),
                                      next(c for c in same if c.granularity == "per_channel"))
                session.write(plan)
                grain = f"g{job.group_size}" if granularity == "per_group" else "per-channel"
                label = f"int{bits} {grain}" + (f" {sparsity:.0%} sparse" if sparsity else "")
                rows.append({"config": label, "bytes": file_bytes(model), "metric": job.metric(model)})
                print(f"    uniform {label:<26} {rows[-1]['bytes'] / job.float_bytes:.4f}x  "
                      f"metric {rows[-1]['metric']:.4f}", flush=True)
    session.restore()
    return rows


# ---------------------------------------------------------------------------------------------- adaptive
def adaptive(job: Job, cap: int, search: str, bounded: bool = False) -> dict[str, Any]:
    model = job.fresh()
    kwargs: dict[str, Any] = {"loss_fn": job.loss_fn, "search": "joint" if search == NO_METRIC else search}
    if search == "joint" and job.val_metric is not None:  # no bound: the metric only chooses among measured plans
        kwargs.update(metric_fn=job.val_metric)
    if bounded:
        kwargs.update(metric_fn=job.val_metric, max_metric_drop=BOUND_POINTS)
    started, cpu = time.perf_counter(), time.thread_time()
    try:
        result = compress(model, Budget(size=cap), job.calibration, **kwargs)
    except (BudgetError, ValueError) as error:
        found = re.search(r"after (\d+) evaluations", str(error))
        return {"refused": str(error)[:600], "smallest": getattr(error, "smallest", None),
                "evaluations": int(found.group(1)) if found else None, "seconds": time.perf_counter() - started}
    row = {"bytes": result.file_bytes, "metric": job.metric(model), "evaluations": result.evaluations,
           "seconds": time.perf_counter() - started, "cpu_s": time.thread_time() - cpu, "steps": result.steps,
           "plan": [r["label"] for r in result.plan]}
    forget(model)
    return row


# ---------------------------------------------------------------------------------------------- ranking
def rank_correlation(job: Job, per_layer: int | None) -> dict[str, Any]:
    """Spearman of predicted vs measured validation-loss change, each candidate on its layer alone."""
    assert job.val_loss is not None
    model = job.fresh()
    layers, _ = select_layers(model, QUANT_MODULE_TYPES)
    weights = {n: layer_weight(n, m) for n, m in layers.items()}
    fisher = diagonal_fisher(model, weights, job.calibration, feed, job.loss_fn)
    where = positions(model, layers, job.calibration[0], feed)
    base = job.val_loss(model)
    predicted, measured, squared = [], [], []
    for name in layers:
        options = [c for c in layer_candidates(name, layers[name], weights[name], fisher[name], where[name], 0, "mse")
                   if c.score > 0]
        if per_layer is not None and len(options) > per_layer:
            options = [options[round(i * (len(options) - 1) / (per_layer - 1))] for i in range(per_layer)]
        original = weights[name].detach().clone()
        for c in options:
            approx, _ = realise(original, fisher[name], c, "mse")
            with torch.no_grad():
                weights[name].copy_(approx)
            predicted.append(c.score)
            measured.append(job.val_loss(model) - base)
            squared.append(float((approx - original).square().sum()))
        with torch.no_grad():
            weights[name].copy_(original)
    return {"candidates": len(predicted), "spearman_fisher": float(spearmanr(predicted, measured)[0]),
            "spearman_dw2": float(spearmanr(squared, measured)[0])}


# ---------------------------------------------------------------------------------------------- cost
def cost(job: Job) -> dict[str, Any]:
    """Thread CPU seconds of compress()'s phases on ``job`` (the built-in SmallCNN job) against its fit."""
    model = job.fresh()
    layers, _ = select_layers(model, QUANT_MODULE_TYPES)
    keys = {n: weight_key(n, m) for n, m in layers.items()}
    weights = {n: layer_weight(n, m) for n, m in layers.items()}
    out: dict[str, Any] = {"fit_s": job.fit_s, "fit_cpu_s": job.fit_cpu_s}
    clock = time.thread_time()
    where = positions(model, layers, job.calibration[0], feed)
    fisher = diagonal_fisher(model, weights, job.calibration, feed, job.loss_fn)
    out["fisher_s"], clock = time.thread_time() - clock, time.thread_time()
    for label, sparsities in (("candidates_s", (0.0,)), ("candidates_with_sparsity_s", SPARSITIES)):
        clock = time.thread_time()
        candidates = {n: layer_candidates(n, layers[n], weights[n], fisher[n], where[n], count, "mse",
                                          sparsities=sparsities) for n, count in aliases(model, keys).items()}
        out[label] = time.thread_time() - clock
    clock = time.thread_time()
    Problem(candidates, fixed_bytes(model, keys), 0, int(0.15 * job.float_bytes), None).choose(0)
    out["solve_s"] = time.thread_time() - clock
    clock = time.thread_time()
    compress(job.fresh(), Budget(size=0.15), job.calibration)
    out["compress_s"] = time.thread_time() - clock
    fit_s = job.fit_cpu_s or float("nan")
    out["scoring_and_solving_fraction"] = (out["fisher_s"] + out["candidates_s"] + out["solve_s"]) / fit_s
    out["with_sparsity_fraction"] = (out["fisher_s"] + out["candidates_with_sparsity_s"] + out["solve_s"]) / fit_s
    out["compress_fraction"] = out["compress_s"] / fit_s
    return out


# ---------------------------------------------------------------------------------------------- one job
def run_job(job: Job, budget_count: int, bounded: bool, between: bool = False) -> dict[str, Any]:
    print(f"\n{job.name}: fp32 file {job.float_bytes} B" + (f", fit {job.fit_s:.1f} s" if job.fit_s else ""),
          flush=True)
    fp32 = job.metric(job.fresh())
    grid = uniform_grid(job)
    front = frontier(grid)
    extra = [int(f * job.float_bytes) for f in job.extra_budgets]
    rows = []
    sizes = budgets_along(grid, min(budget_count, job.most_budgets), most=job.most_budgets)
    middles = {(a + b) // 2 for a, b in zip(sizes, sizes[1:])} - set(sizes) if between else set()
    for cap in sorted(set(sizes) | set(extra) | middles):
        best = best_within(grid, cap)
        row: dict[str, Any] = {"budget": cap, "budget_x": cap / job.float_bytes, "uniform": best,
                               "between": cap in middles}
        for search in (*SEARCHES, NO_METRIC):
            row[search] = adaptive(job, cap, search)
        if bounded and job.val_metric is not None:
            row["joint_bounded"] = adaptive(job, cap, "joint", bounded=True)
        rows.append(row)
        print(f"  budget {cap / job.float_bytes:.4f}x: uniform "
              + (f"{best['config']} {best['metric']:.4f}" if best else "none fits")
              + "".join(f" | {s} " + (f"{row[s]['metric']:.4f} ({row[s]['bytes']} B, {row[s]['evaluations']} ev.)"
                                       if "metric" in row[s]
                                       else "refused") for s in (*SEARCHES, NO_METRIC))
              + (f" | bounded {row['joint_bounded'].get('metric', 'refused')} after "
                 f"{row['joint_bounded'].get('evaluations')} evaluations" if "joint_bounded" in row else ""),
              flush=True)
    return {"fp32_metric": fp32, "float_bytes": job.float_bytes, "fit_s": job.fit_s, "grid": grid,
            "frontier": [r["config"] for r in front], "rows": rows}


# ---------------------------------------------------------------------------------------------- verdict and plot
def verdict(seeds: list[dict[str, Any]], search: str) -> dict[str, Any]:
    """Per seed and budget (each seed's uniform frontier gives its own budgets): ``search``'s metric minus the best
    uniform's, against the seed spread (max - min over seeds of the float model's metric; 0 with one seed). Holds
    when it is at least minus the spread everywhere (a refused plan is not) and above the spread at half or more."""
    spread = max(s["fp32_metric"] for s in seeds) - min(s["fp32_metric"] for s in seeds)
    pairs = []
    for seed in seeds:
        for row in seed["rows"]:
            uniform = row["uniform"]["metric"] if row["uniform"] else float("nan")
            diff = row[search].get("metric", float("nan")) - uniform
            pairs.append({"budget_x": row["budget_x"], "minus_uniform": diff, "at_least": diff >= -spread,
                          "strictly": diff > spread, "uniform_loss": seed["fp32_metric"] - uniform,
                          "between": row.get("between", False)})
    holds = all(p["at_least"] for p in pairs) and 2 * sum(p["strictly"] for p in pairs) >= len(pairs)
    # a second count, beside the full one (never instead of it): only the budgets where the best uniform loses more
    # than the spread to its seed's float model (elsewhere no search can be better than it by more than the spread)
    lossy = [p for p in pairs if p["uniform_loss"] > spread]
    on_frontier = [p for p in pairs if not p["between"]]  # with --between: the frontier's budgets alone, too
    return {"seed_spread": spread, "per_budget": pairs, "holds": holds,
            "lossy_budgets": len(lossy), "lossy_strictly": sum(p["strictly"] for p in lossy),
            "frontier_budgets": len(on_frontier), "frontier_strictly": sum(p["strictly"] for p in on_frontier),
            "frontier_holds": all(p["at_least"] for p in on_frontier)
            and 2 * sum(p["strictly"] for p in on_frontier) >= len(on_frontier)}


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no frontier plot")
        return
    jobs = results["jobs"]
    fig, axes = plt.subplots(1, len(jobs), figsize=(5.5 * len(jobs), 4.2), squeeze=False)
    for ax, (name, seeds) in zip(axes[0], jobs.items()):
        first = next(iter(seeds.values()))
        base = first["float_bytes"]
        grid = first["grid"]
        ax.scatter([r["bytes"] / base for r in grid], [r["metric"] for r in grid], s=12, c="lightgray",
                   label="uniform grid (first seed)")
        front = frontier(grid)
        ax.plot([r["bytes"] / base for r in front], [r["metric"] for r in front], "k--", lw=1, label="uniform best")
        for search, style, color in zip((*SEARCHES, NO_METRIC), "oDs^v", ("C0", "C2", "C1", "C3", "C4")):
            for index, seed in enumerate(seeds.values()):  # seeds after the first: lighter, dotted
                done = [r[search] for r in seed["rows"] if "metric" in r[search]]
                ax.plot([d["bytes"] / base for d in done], [d["metric"] for d in done], marker=style, ms=4, color=color,
                        ls="-" if index == 0 else ":", alpha=1.0 if index == 0 else 0.5,
                        label=f"search={search!r}" if index == 0 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("file / fp32 file")
        ax.set_ylabel("min cosine to fp32" if "MiniLM" in name else "test accuracy (%)")
        top = first["fp32_metric"]
        ax.set_ylim(top - (0.15 if "MiniLM" in name else 8), top + (0.01 if "MiniLM" in name else 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"written: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, small models, a reduced grid")
    parser.add_argument("--no-minilm", action="store_true", help="skip all-MiniLM-L6-v2 (a few minutes)")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18-style CNN")
    parser.add_argument("--no-smallcnn", action="store_true", help="skip SmallCNN (a run split in two on a busy box)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--resnet", type=int, nargs=3, default=None, metavar=("WIDTH", "IMAGE_SIZE", "EPOCHS"),
                        help="the ResNet's first-stage width, input side and epochs (default 16 28 2; quick 8 14 1)")
    parser.add_argument("--minilm-budgets", type=int, default=4, help="uniform frontier sizes tried on MiniLM")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="CNN seeds (default 0 1; quick 0)")
    parser.add_argument("--between", action="store_true",
                        help="CNNs: also the budget halfway between each two frontier sizes (where a user's budget "
                             "is not a uniform file's size: the best uniform is the next smaller one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    quick = args.quick
    path = args.json or RESULTS / ("adaptive_quick.json" if quick else "adaptive.json")
    load = os.getloadavg()
    print(f"torch {torch.__version__}; CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    cnn_grid = {"sparsity": (0.0,) if quick else (0.0, 0.5), "bits": (2, 3, 4, 8) if quick else (2, 3, 4, 6, 8),
                "granularity": ("per_channel", "per_group")}
    seeds = args.seeds or ([0] if quick else [0, 1])
    out: dict[str, Any] = {"machine": machine_info(quick), "load_average_start": load, "jobs": {}, "verdicts": {},
                           "ranks": {}}
    jobs: list[list[Job]] = [] if args.no_smallcnn else [smallcnn_jobs(seeds, 1 if quick else 4, cnn_grid)]
    if not args.no_resnet:
        width, side, epochs = args.resnet or ((8, 14, 1) if quick else (16, 28, 2))
        jobs.append(resnet_jobs(seeds, width, side, epochs, cnn_grid))
    out["cost"] = {}
    for group in jobs:  # the first seed of each CNN: the SmallCNN one is the built-in job of the target
        c = out["cost"][group[0].name] = cost(group[0])
        print(f"\ncost on {group[0].name} (CPU s): fit {c['fit_cpu_s']:.2f} ({c['fit_s']:.2f} wall), "
              f"Fisher {c['fisher_s']:.3f}, "
              f"candidates {c['candidates_s']:.3f} ({c['candidates_with_sparsity_s']:.3f} with sparsity), solve "
              f"{c['solve_s']:.4f}: {100 * c['scoring_and_solving_fraction']:.1f} % of the fit "
              f"({100 * c['with_sparsity_fraction']:.1f} % with sparsity); a whole compress() "
              f"{100 * c['compress_fraction']:.1f} %", flush=True)
    if not args.no_minilm:
        mini_grid = {"sparsity": (0.0,), "bits": (2, 3, 4, 8),
                     "granularity": ("per_channel", "per_group")}
        jobs.append([minilm_job(mini_grid, 16 if quick else 48, args.minilm_budgets)])
    for group in jobs:
        family = group[0].name.split(" seed")[0]
        out["jobs"][family] = {}
        for job in group:
            out["jobs"][family][job.name] = run_job(job, 4, bounded=job.val_metric is not None,
                                                    between=args.between and job.val_metric is not None)
            if job.val_loss is not None:
                ranks = rank_correlation(job, None if "SmallCNN" in job.name else 6)
                out["ranks"][job.name] = ranks
                print(f"  Spearman predicted vs measured val-loss change over {ranks['candidates']} candidates: "
                      f"{ranks['spearman_fisher']:.3f} (sum dW^2: {ranks['spearman_dw2']:.3f})", flush=True)
        out["verdicts"][family] = {}
        for search in VERDICT_SEARCHES:
            v = out["verdicts"][family][search] = verdict(list(out["jobs"][family].values()), search)
            print(f"  {family}, search={search!r}: at least as good as the best uniform at every budget (within the "
                  f"seed spread), strictly better at half or more: {'PASS' if v['holds'] else 'FAIL'} "
                  f"({sum(b['strictly'] for b in v['per_budget'])}/{len(v['per_budget'])} strictly better; "
                  f"over only the budgets where the best uniform loses more than the spread: "
                  f"{v['lossy_strictly']}/{v['lossy_budgets']}; the frontier's budgets alone: "
                  f"{v['frontier_strictly']}/{v['frontier_budgets']})", flush=True)
        out["load_average_end"] = os.getloadavg()
        write_json(path, out)  # after every model: a long run stopped on a loaded machine keeps what it measured
        plot(out, path.with_name(path.stem + "_frontier.png"))


if __name__ == "__main__":
    main()
