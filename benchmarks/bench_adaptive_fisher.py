"""Which Fisher should plan the widths at the end of an ``AdaptiveCompression`` fit (issue 23, "one currency")?

    python benchmarks/bench_adaptive_fisher.py [--seeds 0 1] [--epochs 3] [--resnet] [--json PATH]

The fit (SmallCNN on MNIST-5k, batch 64, one torch thread, ``Budget(size=0.15)``, no validation; ``--resnet``: the
ResNet-18-style CNN of ``bench_resnet.py``, width 16, 28 px, 2 epochs) is run once per seed with the callback as it
is (the ResNet at ``Budget(size=0.3)``). At its end, on the masks reached (frozen into the weights) and before the
widths are planned, it keeps:

- ``calibration``: the Fisher the end of the fit plans on today, ``diagonal_fisher`` by backward passes on the
  calibration batches (labels drawn from the model's own softmax), timed here;
- ``stats_whole``: the fit's gradient statistics, ``E[g^2] = mean^2 + var`` over every step they counted
  (``statistics_fisher``): from the start of the fit to its last pruning event (they stop counting there; the
  callback never restarts them);
- ``stats_last``: the same over the last epoch only, from a second accumulator fed the same gradients (the product
  keeps no such window; its per-step cost is reported).

Per Fisher, on the same candidates (int2/3/4/6/8 x granularity, sparsity fixed at the masks reached):

1. Spearman rank correlation of predicted ``1/2 sum(F dW^2)`` against the measured validation-loss change, each
   candidate written into its layer alone (``dW`` does not depend on the Fisher at sparsity 0, so the measured
   changes are shared): pooled over every layer (what the knapsack trades) and within each layer.
2. The scale check: per layer, the median of measured / predicted. The batch gradients' ``E[g^2]`` is not the
   per-sample Fisher (different factor, true labels, the whole trajectory), so its absolute scale differs; the
   knapsack reads only the layers' relative scale, and the correction step (``Session.correct``) compares each
   layer's *share* of the measured drop with its share of the predicted one, so a factor common to every layer
   cancels. Reported: the global factor and the spread of the per-layer factors (max / min), which does matter.
3. ``compress(search="bits")`` at three budgets on copies of the end-of-fit model, as the callback calls it, with
   that Fisher (``sync`` hands it in), round to nearest: test accuracy delivered without a bound, and (SmallCNN)
   with a 1-point bound on validation accuracy (verification evaluations reported).
4. Thread CPU seconds of each Fisher (the accumulator's whole-fit cost for ``stats_last``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn

from lightning_compress import Budget, compress
from lightning_compress.adaptive import BudgetError
from lightning_compress.adaptive.candidates import layer_candidates, realise
from lightning_compress.adaptive.costs import positions
from lightning_compress.adaptive.fisher import diagonal_fisher
from lightning_compress.adaptive.in_fit import statistics_fisher
from lightning_compress.callbacks import adaptive_plan
from lightning_compress.callbacks.adaptive import AdaptiveCompression
from lightning_compress.pruning.statistics import GradientStatistics
from lightning_compress.quantization.calibration import feed
from lightning_compress.quantization.carried import forget
from lightning_compress.quantization.coverage import QUANT_MODULE_TYPES, layer_weight, select_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json

SMALLCNN = (0.15, (0.07, 0.085, 0.1))  # the fit's size budget, then compress(search="bits")'s on the masks reached
RESNET = (0.3, (0.1, 0.13, 0.16))  # (fractions of the fp32 file); below 0.1 every plan is refused or near chance
WIDTHS = (2, 3, 4, 6, 8)
BOUND_POINTS = 1.0
SOURCES = ("calibration", "stats_whole", "stats_last")


class LastEpoch(pl.Callback):
    """``E[g^2]`` of the last epoch's steps, fed the gradients the fit's statistics see (every 2nd step, as they)."""

    def __init__(self, adaptive: AdaptiveCompression) -> None:
        self.adaptive, self.stats, self.cpu_s = adaptive, None, 0.0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != trainer.max_epochs - 1:
            return
        clock = time.thread_time()
        weights = [layer_weight(n, m) for n, m in self.adaptive.layers.modules.items()]
        if self.stats is None:
            self.stats = GradientStatistics(list(self.adaptive.layers.modules), [w.shape for w in weights],
                                            per_weight=True, per_unit=False, weight_every=2)
        self.stats.update([w.grad for w in weights], weights)
        self.cpu_s += time.thread_time() - clock


class Captured(AdaptiveCompression):
    """The callback as it is, keeping the end-of-fit model, batches and Fishers before it plans the widths."""

    def _compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule, method: str | None = None,
                  mid_fit: bool = False) -> Any:
        assert self.run.stats is not None
        clock = time.thread_time()
        self.whole = statistics_fisher(self.run.stats)
        self.whole_s = time.thread_time() - clock
        self.end_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.batches = adaptive_plan.calibration_batches(trainer, pl_module, self.calibration_batches, None)
        return super()._compress(trainer, pl_module, method, mid_fit)


def val_loss(loader: list[Any]) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def loss(model: nn.Module) -> float:
        model.eval()
        return sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in loader) / \
            sum(len(y) for _, y in loader)
    return loss


def fitted(make: Callable[[], pl.LightningModule], data: PreloadedMNIST5k, epochs: int, seed: int,
           fit_budget: float) -> tuple[pl.LightningModule, Captured, LastEpoch, float]:
    pl.seed_everything(seed, verbose=False)
    model = make()
    adaptive = Captured(budget=Budget(size=fit_budget), verbose=0, method="rtn")
    last = LastEpoch(adaptive)
    clock = time.thread_time()
    model.train()
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               default_root_dir=os.path.join("/tmp", f"lc-bench-fisher-{os.getpid()}"), enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
               callbacks=[adaptive, last]).fit(model, datamodule=data)
    return model, adaptive, last, time.thread_time() - clock


def filled(fisher: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``fisher`` on every layer: a layer the statistics do not track gets their mean per weight (as the planner)."""
    known = [f for f in fisher.values()]
    mean = sum(float(f.double().sum()) for f in known) / max(sum(f.numel() for f in known), 1)
    return {n: fisher[n].float() if n in fisher else torch.full_like(w, mean, dtype=torch.float32)
            for n, w in weights.items()}


def ranking(model: nn.Module, fishers: Mapping[str, Mapping[str, Tensor]], loss: Callable[[nn.Module], float],
            example: Any) -> dict[str, Any]:
    layers, _ = select_layers(model, QUANT_MODULE_TYPES)
    weights = {n: layer_weight(n, m) for n, m in layers.items()}
    where = positions(model, layers, example, feed)
    base = loss(model)
    rows: list[dict[str, Any]] = []
    for name in layers:
        original = weights[name].detach().clone()
        options = layer_candidates(name, layers[name], original, fishers["calibration"][name], where[name], 0,
                                   "mse", widths=WIDTHS, sparsities=(0.0,))
        for c in options:
            approx, _ = realise(original, fishers["calibration"][name], c, "mse")
            with torch.no_grad():
                weights[name].copy_(approx)
            row = {"layer": name, "label": c.label(), "measured": loss(model) - base}
            for source, fisher in fishers.items():
                row[source] = 0.5 * float((fisher[name] * (approx.float() - original.float()).square()).sum())
            rows.append(row)
        with torch.no_grad():
            weights[name].copy_(original)
    out: dict[str, Any] = {"candidates": len(rows), "rows": rows}
    for source in fishers:
        pooled = float(spearmanr([r[source] for r in rows], [r["measured"] for r in rows])[0])
        within = [float(spearmanr([r[source] for r in rows if r["layer"] == n],
                                  [r["measured"] for r in rows if r["layer"] == n])[0]) for n in layers]
        factors = {n: statistics.median(r["measured"] / r[source] for r in rows
                                        if r["layer"] == n and r[source] > 0 and r["measured"] > 0)
                   if any(r["layer"] == n and r[source] > 0 and r["measured"] > 0 for r in rows) else None
                   for n in layers}
        known = [f for f in factors.values() if f]
        out[source] = {"spearman_pooled": pooled, "spearman_within_layer_mean": statistics.fmean(within),
                       "measured_over_predicted_by_layer": factors,
                       "global_factor": statistics.median(known) if known else None,
                       "layer_factor_spread": max(known) / min(known) if known else None}
    return out


def delivered(make: Callable[[], nn.Module], state: Mapping[str, Tensor], batches: list[Any],
              fisher: Mapping[str, Tensor] | None, fraction: float, val: list[Any], test: list[Any],
              bounded: bool) -> dict[str, Any]:
    model = make()
    model.load_state_dict(state)
    model.eval()
    kwargs: dict[str, Any] = {}
    if bounded:
        kwargs.update(metric_fn=lambda m: accuracy(m, val), max_metric_drop=BOUND_POINTS)
    clock = time.thread_time()
    try:
        result = compress(model, Budget(size=fraction), batches, forward=feed, search="bits", method="rtn",
                          sync=None if fisher is None else (lambda _: dict(fisher)), **kwargs)
    except (BudgetError, ValueError) as error:
        return {"refused": str(error)[:300]}
    row = {"file_bytes": result.file_bytes, "test_accuracy": accuracy(model, test), "evaluations": result.evaluations,
           "cpu_s": time.thread_time() - clock, "plan": [r["label"] for r in result.plan], "steps": result.steps}
    forget(model)
    return row


def one_job(name: str, make: Callable[[], pl.LightningModule], data: PreloadedMNIST5k, epochs: int,
            seed: int, budgets: tuple[float, tuple[float, ...]], bounds: tuple[str, ...]) -> dict[str, Any]:
    model, adaptive, last, fit_s = fitted(make, data, epochs, seed, budgets[0])
    val, test = list(data.val_dataloader()), list(data.test_dataloader())
    end = make()
    end.load_state_dict(adaptive.end_state)
    end.eval()
    layers, _ = select_layers(end, QUANT_MODULE_TYPES)
    weights = {n: layer_weight(n, m) for n, m in layers.items()}
    clock = time.thread_time()
    calibration = diagonal_fisher(end, weights, adaptive.batches, feed)
    calibration_s = time.thread_time() - clock
    assert last.stats is not None
    fishers = {"calibration": calibration, "stats_whole": filled(adaptive.whole, weights),
               "stats_last": filled(statistics_fisher(last.stats), weights)}
    out: dict[str, Any] = {
        "fit_cpu_s": fit_s, "delivered_by_the_fit": {"file_bytes": adaptive.result.file_bytes if adaptive.result
                                                     else None, "test_accuracy": accuracy(model, test)},
        "end_of_fit_float_test_accuracy": accuracy(end, test),
        "tracked": sorted(adaptive.whole), "quantized": sorted(layers),
        "cpu_s": {"calibration": calibration_s, "stats_whole": adaptive.whole_s,
                  "stats_last_accumulator_in_fit": last.cpu_s},
        "steps_counted": {"stats_whole": adaptive.run.stats.weight_count if adaptive.run.stats else None,
                          "stats_last": last.stats.weight_count}}
    out["fit_budget"], out["budgets_tried"] = budgets
    print(f"{name}: fit {fit_s:.1f} s CPU, end-of-fit float test {out['end_of_fit_float_test_accuracy']:.2f} %; "
          f"Fisher CPU s: calibration {calibration_s:.3f}, statistics "
          f"{adaptive.whole_s:.4f} (last-epoch accumulator {last.cpu_s:.2f} in the fit)", flush=True)
    out["ranking"] = ranking(end, fishers, val_loss(val), adaptive.batches[0])
    for source in SOURCES:
        r = out["ranking"][source]
        print(f"  {source:<12} Spearman pooled {r['spearman_pooled']:.3f}, within layers "
              f"{r['spearman_within_layer_mean']:.3f}; measured/predicted {r['global_factor']:.3g} "
              f"(layers' spread x{r['layer_factor_spread']:.3g})", flush=True)
    out["budgets"] = {}
    for fraction in budgets[1]:
        per = out["budgets"][str(fraction)] = {}
        for source in SOURCES:
            fisher = None if source == "calibration" else fishers[source]
            per[source] = {bound: delivered(make, adaptive.end_state, adaptive.batches, fisher, fraction, val, test,
                                            bound == "bounded") for bound in bounds}
            print(f"  {fraction:.3f}x {source:<12} " + "; ".join(
                f"{k}: " + (f"test {v['test_accuracy']:.2f} % ({v['file_bytes']} B, {v['evaluations']} evals)"
                            if "refused" not in v else "refused") for k, v in per[source].items()), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resnet", action="store_true", help="also the ResNet-18-style CNN (width 16, 28 px)")
    parser.add_argument("--resnet-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "adaptive_fisher.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    load = os.getloadavg()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; load average {load}", flush=True)
    from lightning_compress.demos.models import SmallCNN

    data = PreloadedMNIST5k(batch_size=64)
    out: dict[str, Any] = {"machine": machine_info(), "load_average_start": load, "bound_points": BOUND_POINTS,
                           "jobs": {}}
    jobs: list[tuple[str, Callable[[], pl.LightningModule], int, Any, tuple[str, ...]]] = [
        (f"SmallCNN seed {s}", SmallCNN, args.epochs, SMALLCNN, ("free", "bounded")) for s in args.seeds]
    if args.resnet:  # no bound: its refusals (larger budgets tried, each measured) cost minutes per budget
        from bench_resnet import ResNet18
        jobs += [(f"ResNet-18 w16 28px seed {s}", lambda: ResNet18(16, 28), 2, RESNET, ("free",))
                 for s in args.resnet_seeds]
    for name, make, epochs, budgets, bounds in jobs:
        seed = int(name.rsplit(" ", 1)[1])
        out["jobs"][name] = one_job(name, make, data, epochs, seed, budgets, bounds)
        out["load_average_end"] = os.getloadavg()
        write_json(args.json, out)
    print(f"load average at the end {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
