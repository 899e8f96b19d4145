"""Overhead of gradient statistics and of ``GradientStabilityPruning``, measured against a baseline in the same run.

Part 1 (micro): one ``GradientStatistics.update`` per step / one ``torch.optim.Adam(foreach=True).step()`` over the
same weight tensors (the Linear/Conv weights the callback tracks), for the repo's ``SmallCNN`` (28x28), the BERT-style
transformer classifier of ``bench_transformer_structured.py`` (``RowTransformer``: width 128, 4 layers, 27 tracked
tensors) and an ~8M parameter MLP (784-2048-1792-1536-10), in the unstructured mode (per_weight=True,
per_unit=False; the callback samples every 2nd step into them, ``weight_every=2``, so a block of 32 updates holds 16
Welford steps: the figure is the cost per optimizer step; the row "every step" is what one sampled step costs, for
information) and the structured / cheap mode (per_weight=False, per_unit=True). Gradients are random normal
tensors set as ``.grad`` so both read the same tensors. The per-unit mode merges its stored samples every 32 steps,
so each timed block of the statistics is exactly 32 updates (one merge): the figure is the amortized per-step cost.
``update`` is called with autograd enabled, as the callback calls it from ``on_after_backward``. Adam and statistics
are timed in alternation so background load hits both alike, in wall time and in thread CPU time; the ratio compared
with the target is the CPU-time one, which leaves out the time other processes hold the core (on a shared machine
the wall-time ratio scatters with their load). Target: ratio <= 0.3.
``--compile`` also times ``torch.compile`` of the per-weight step on the MLP: its first call (caches off) and its
per-step cost next to the eager update. ``--before REV`` also times the statistics as they were at git revision REV
against the current ones, in the same process and alternation (thread CPU time).

Part 2 (training): ``Trainer.fit`` without the callback, with ``GradientStabilityPruning(sparsity=0.8,
evaluate=False)`` (statistics + masking + mask computation at the pruning events, no evaluation passes) and with
``GradientStabilityPruning(sparsity=0.8)`` (the defaults: evaluate=True, events aligned with validation when the
schedule allows, the gate's "after" on the validation's own samples with the paired early stop; see the README's
"Validation around each step"), in two jobs: ``SmallCNN`` on ``MNIST5kDataModule`` from scratch, and the BERT-style
``RowTransformer`` fine-tuned (from one epoch of pre-training, done once outside the timing) on the same data read
as 28 rows of 28 pixels (the data ``bench_transformer_structured`` uses; no text data set is installed offline at a
size this machine trains in minutes). Both 4 epochs, batch 64, validation every epoch (the fit length of the
existing jobs: long enough for the default ramp to end an epoch before the fit does). Each callback configuration
prints the gate's events per fit, evaluation passes and samples per event, the delivered metric and sparsity. Same
seed for every fit, configurations run in alternation, the minimum of the repeats reported; overheads compared with
the targets in process CPU time (wall time beside it). Targets (issue 21): defaults <= 25 % (SmallCNN) / 20 %
(transformer), evaluate=False <= 8 %. ``--epochs 1 2`` times each fit length in its own table (1-3 epoch fits keep
per-step events, each with a full "before" pass); ``--gate`` adds the gate with a bound (``max_metric_drop=0.02``)
on the default schedule and on an explicit per-step one, each beside ``gate_batches=0`` (the whole set before and
after every event, what such events cost before the "before" pass kept its per-sample record).

Allocator: by default the script pins glibc's malloc thresholds (``mallopt``: mmap threshold 32 MiB, no heap trim).
With glibc's adaptive defaults a multi-MB temporary (Adam's foreach ``sqrt`` of the second moment, the statistics'
merge, ``vecdot``'s product) is sometimes served by fresh ``mmap`` pages and page-faults on every step: the 8M MLP's
Adam step then flips between ~12 and ~25 ms from one process (or mode) to the next, which would make the ratio
meaningless. Pinned, both sides run allocation-fault-free (the stricter baseline). ``--default-malloc`` turns it off.

Run: ``python benchmarks/bench_stats_overhead.py`` (about 15 min on 2 loaded cores) or ``--quick``. The figures also go
to ``--json`` (default ``benchmarks/results/stats_overhead.json``), which ``run_all.py`` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import inspect
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_timing` when run as a script
import lightning.pytorch as pl
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, measure_interleaved, write_json
from bench_transformer_structured import RowTransformer

import lightning_compress.callbacks.base as callback_base
import lightning_compress.integration.evaluation as evaluation
import lightning_compress.pruning.run as pruning_run
from lightning_compress import GradientStabilityPruning
from lightning_compress.core.selection import DEFAULT_MODULE_TYPES, select_modules
from lightning_compress.demos.data import MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier, SmallCNN
from lightning_compress.pruning.state import MaskState
from lightning_compress.pruning.statistics import GradientStatistics

MICRO_TARGET = 0.3
MLP_HIDDEN = [2048, 1792, 1536]
TRANSFORMER_NAME = "BERT 4x128 (RowTransformer)"  # bench_transformer_structured's default model
WEIGHT_EVERY = 2  # the callback's default per_weight_every: per-weight statistics of every 2nd step
EVERY_STEP = "unstructured (every step)"  # what one sampled step costs: information, no target
MODES = {
    f"unstructured (1/{WEIGHT_EVERY} steps)": dict(per_weight=True, per_unit=False, weight_every=WEIGHT_EVERY),
    EVERY_STEP: dict(per_weight=True, per_unit=False),
    "structured (per_unit)": dict(per_weight=False, per_unit=True),
}


# ---------------------------------------------------------------------------------------------- allocator
def pin_glibc_malloc() -> str:
    """Fix glibc's mmap / trim thresholds so that big temporaries are reused from the heap (see the docstring)."""
    if not sys.platform.startswith("linux"):
        return "default (not Linux)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc mallopt(mmap_threshold=32MiB, trim_threshold=1GiB)" if ok else "default (mallopt unavailable)"


# ---------------------------------------------------------------------------------------------- part 1: micro
def tracked_weights(model: torch.nn.Module) -> tuple[list[str], list[torch.nn.Parameter]]:
    """The weights the callback tracks by default (Linear / Conv modules), in the same order."""
    modules = select_modules(model, DEFAULT_MODULE_TYPES)
    return list(modules), [m.weight for m in modules.values()]


def profile_update(label: str, update, steps: int) -> None:  # type: ignore[no-untyped-def]
    """Top operators (self CPU time) of ``steps`` calls of ``update``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            update()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = ", ".join(
        f"{e.key.removeprefix('aten::')} {100 * e.self_cpu_time_total / total:.0f}% ({e.count // steps}/step)"
        for e in events[:6]
    )
    print(f"    profile {label}: {top}")


def _cpu_timed(fn, inner: int, sink: list[float]):  # type: ignore[no-untyped-def]
    """A block of ``inner`` calls of ``fn`` that appends its thread CPU seconds per call to ``sink``: unlike wall
    time it leaves out the time other processes hold this core (the machine is shared), not their cache pressure."""

    def block() -> None:
        start = time.thread_time()
        for _ in range(inner):
            fn()
        sink.append((time.thread_time() - start) / inner)

    return block


def micro(name: str, model: torch.nn.Module, repeats: int, block_steps: int = 32, profile: bool = False) -> list[dict]:
    names, weights = tracked_weights(model)
    generator = torch.Generator().manual_seed(0)
    for w in weights:
        w.grad = torch.randn(w.shape, generator=generator) * 1e-3
    grads = [w.grad for w in weights]
    optimizer = torch.optim.Adam(weights, lr=1e-3, foreach=True)
    n_params = sum(w.numel() for w in weights)
    # Adam blocks: enough steps to last roughly as long as a statistics block, at least 1
    adam_inner = max(1, min(block_steps, int(2e8 // max(n_params * 8, 1))))
    rows = []
    for mode, flags in MODES.items():
        stats = GradientStatistics(names, [w.shape for w in weights], **flags)
        update = functools.partial(stats.update, grads, weights)
        cpu: dict[str, list[float]] = {"adam": [], "stats": []}
        timings = measure_interleaved(
            {"adam": _cpu_timed(optimizer.step, adam_inner, cpu["adam"]),
             "stats": _cpu_timed(update, block_steps, cpu["stats"])},
            repeats=repeats,
            warmup=1,
        )
        adam = [t / adam_inner for t in timings["adam"].samples]  # wall seconds per call
        st = [t / block_steps for t in timings["stats"].samples]
        cpu_adam, cpu_st = cpu["adam"][1:], cpu["stats"][1:]  # the warm-up block left out
        if profile:
            profile_update(f"{name}, {mode}", update, block_steps)
        # ratio per alternating pair (adjacent in time, so slow load drift cancels), then the median
        pairs, cpu_pairs = [u / a for u, a in zip(st, adam)], [u / a for u, a in zip(cpu_st, cpu_adam)]
        rows.append(
            dict(model=name, params=n_params, tensors=len(weights), mode=mode,
                 adam_ms=1e3 * statistics.median(cpu_adam), stats_ms=1e3 * statistics.median(cpu_st),
                 # the headline ratio is the CPU-time one: on a shared machine the wall-time pairs scatter
                 # with other processes' load (SmallCNN: 0.10x to 0.36x from one run to the next, CPU time 0.25x
                 # to 0.27x)
                 ratio=statistics.median(cpu_pairs), ratio_wall=statistics.median(pairs),
                 ratio_range=[min(cpu_pairs), max(cpu_pairs)], ratio_wall_range=[min(pairs), max(pairs)],
                 adam_wall_ms=1e3 * statistics.median(adam), stats_wall_ms=1e3 * statistics.median(st),
                 spread=max(timings["adam"].spread(), timings["stats"].spread()))
        )
    return rows


def load_before(revision: str):  # type: ignore[no-untyped-def]
    """``GradientStatistics`` as it was at git ``revision`` (its ``statistics.py`` and ``moments.py`` loaded as
    stand-alone modules), to time the change against it in the same process and conditions."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parent.parent
    folder = Path(tempfile.mkdtemp(prefix="stats_before_"))
    for module in ("moments", "statistics"):
        source = subprocess.run(["git", "show", f"{revision}:lightning_compress/pruning/{module}.py"], cwd=root,
                                check=True, capture_output=True, text=True).stdout
        source = source.replace("from lightning_compress.pruning.moments import", "from stats_before_moments import")
        (folder / f"stats_before_{module}.py").write_text(source)
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("stats_before_statistics", folder / "stats_before_statistics.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.GradientStatistics


def before_after(name: str, model: torch.nn.Module, before_cls, repeats: int) -> list[dict]:  # type: ignore[no-untyped-def]
    """Thread CPU ms per update of the statistics before and after, and of Adam, timed in alternation."""
    names, weights = tracked_weights(model)
    for w in weights:
        w.grad = torch.randn(w.shape) * 1e-3
    grads = [w.grad for w in weights]
    optimizer = torch.optim.Adam(weights, lr=1e-3, foreach=True)
    adam_inner = max(1, min(32, int(2e8 // max(sum(w.numel() for w in weights) * 8, 1))))
    rows = []
    for mode, flags in MODES.items():
        shapes = [w.shape for w in weights]
        # a revision before sampling takes every step: before / after is then what the callback's default does
        known = inspect.signature(before_cls).parameters
        old = before_cls(names, shapes, **{k: v for k, v in flags.items() if k in known})
        new = GradientStatistics(names, shapes, **flags)
        cpu: dict[str, list[float]] = {"adam": [], "before": [], "after": []}
        measure_interleaved({"adam": _cpu_timed(optimizer.step, adam_inner, cpu["adam"]),
                             "before": _cpu_timed(functools.partial(old.update, grads, weights), 32, cpu["before"]),
                             "after": _cpu_timed(functools.partial(new.update, grads, weights), 32, cpu["after"])},
                            repeats=repeats, warmup=1)
        ms = {key: 1e3 * statistics.median(v[1:]) for key, v in cpu.items()}
        ratio = {key: statistics.median(u / a for u, a in zip(cpu[key][1:], cpu["adam"][1:]))
                 for key in ("before", "after")}
        speedup = statistics.median(b / a for b, a in zip(cpu["before"][1:], cpu["after"][1:]))
        rows.append(dict(model=name, mode=mode, adam_cpu_ms=ms["adam"], before_cpu_ms=ms["before"],
                         after_cpu_ms=ms["after"], before_ratio=ratio["before"], after_ratio=ratio["after"],
                         speedup=speedup))
        print(f"  {name:<28}{mode:>28}  Adam {ms['adam']:8.3f} ms  before {ms['before']:8.3f} ms "
              f"({ratio['before']:.2f}x)  after {ms['after']:8.3f} ms ({ratio['after']:.2f}x)  {speedup:.2f}x faster")
    return rows


def compiled_step(name: str, model: torch.nn.Module, repeats: int) -> dict:
    """``torch.compile`` of the per-weight Welford step (one fused loop per tensor, no scratch) against the eager
    ``GradientStatistics.update``, on the same tensors: the first call's seconds with inductor's caches off (what
    a first fit pays) and the thread CPU ms per step of each. The huge-step check is left out of the compiled step
    (it would add the same read pass as in eager mode): the comparison favours compile."""
    import torch._inductor.config as inductor_config  # benchmark only: the package uses no private inductor API

    names, weights = tracked_weights(model)
    grads = [torch.randn(w.shape) * 1e-3 for w in weights]
    stats = GradientStatistics(names, [w.shape for w in weights], per_weight=True, per_unit=False)
    means, m2s = stats._mean, stats._m2

    def welford(grads, means, m2s, inv_n, keep):  # type: ignore[no-untyped-def]
        for g, mean, m2 in zip(grads, means, m2s):
            d = g - mean
            mean.add_(d * inv_n)
            m2.add_(d * d * keep)

    fused = torch.compile(welford, dynamic=False)
    inv_n, keep = torch.tensor(0.5), torch.tensor(0.5)  # tensors: a new step count does not recompile
    inductor_config.force_disable_caches = True
    try:
        start = time.perf_counter()
        fused(grads, means, m2s, inv_n, keep)
        first = time.perf_counter() - start
    finally:
        inductor_config.force_disable_caches = False
    cpu: dict[str, list[float]] = {"compiled": [], "eager": []}
    measure_interleaved({"compiled": _cpu_timed(lambda: fused(grads, means, m2s, inv_n, keep), 8, cpu["compiled"]),
                         "eager": _cpu_timed(lambda: stats.update(grads, weights), 8, cpu["eager"])},
                        repeats=repeats, warmup=1)
    row = dict(model=name, first_call_s=first, compiled_cpu_ms=1e3 * statistics.median(cpu["compiled"][1:]),
               eager_cpu_ms=1e3 * statistics.median(cpu["eager"][1:]))
    print(f"  torch.compile, {name}: first call {first:.1f} s (caches off); per step {row['compiled_cpu_ms']:.3f} ms "
          f"fused (no huge-step check) vs {row['eager_cpu_ms']:.3f} ms eager update (CPU time)")
    return row


def print_micro(rows: list[dict]) -> None:
    print(f"{'model':<32}{'weights':>9}{'mode':>28}{'Adam ms':>9}{'update ms':>10}{'CPU ratio':>10}{'range':>12}"
          f"{'wall ratio':>11}{'range':>12}{'target':>8}")
    for r in rows:
        verdict = "info" if r["mode"] == EVERY_STEP else "ok" if r["ratio"] <= MICRO_TARGET else "MISSED"
        low, high = r["ratio_range"]
        wall_low, wall_high = r["ratio_wall_range"]
        print(
            f"{r['model']:<32}{r['params'] / 1e6:>8.3f}M{r['mode']:>28}{r['adam_ms']:>9.3f}{r['stats_ms']:>10.3f}"
            f"{r['ratio']:>9.2f}x{f'{low:.2f}-{high:.2f}':>12}{r['ratio_wall']:>10.2f}x"
            f"{f'{wall_low:.2f}-{wall_high:.2f}':>12}{verdict:>8}"
        )
    print("  (CPU ratio, the one compared with the target: median over the alternating pairs of update/Adam in thread "
          "CPU time, which leaves out the time other processes hold the core; range: lowest-highest pair; wall ratio: "
          "the same in wall time; ms columns: thread CPU time)")


# ---------------------------------------------------------------------------------------------- part 2: training
def _instrument(cb: GradientStabilityPruning, acc: dict[str, float]) -> None:
    """Accumulate the wall time of the callback's per-step and per-event work into ``acc`` (perf_counter only:
    a few hundred nanoseconds per call)."""

    def wrap(key: str, fn):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[key] += time.perf_counter() - start

        return timed

    cb.on_after_backward = wrap("statistics (on_after_backward)", cb.on_after_backward)  # type: ignore[method-assign]
    cb.on_before_optimizer_step = wrap(  # type: ignore[method-assign]
        "grad masking (before step)", cb.on_before_optimizer_step
    )
    cb.on_train_batch_end = wrap("pruning events (total)", cb.on_train_batch_end)  # type: ignore[method-assign]
    # the masks in force and the planner are built in the callback's setup: time them where they are defined,
    # wrapping the originals (never an earlier fit's wrapper)
    for (owner, attribute), key in _TIMED.items():
        setattr(owner, attribute, wrap(key, _ORIGINALS[(owner, attribute)]))


END_OF_FIT = "end of fit (delivered model evaluated, checkpoint, report)"
DEFAULTS = "callback, defaults"  # evaluate=True, align_events / gate_batches automatic: what a user gets
NO_EVAL = "callback, evaluate=False"
CONFIGS = ["baseline", NO_EVAL, DEFAULTS]
# --gate: the gate with a bound, where events do not follow a validation (1-3 epoch fits, explicit per-step
# schedules): the per-sample record of the event's own "before" pass with the paired early stop, next to
# gate_batches=0 (the whole set before and after each event: what these events cost before the record)
BOUND, BOUND_WHOLE = "defaults + max_metric_drop=0.02", "  same, gate_batches=0 (whole set)"
PER_STEP, PER_STEP_WHOLE = "per-step schedule + bound", "  same, gate_batches=0 (whole set) "
PER_STEP_SCHEDULE = dict(start_step=5, end_step=45, frequency=10)  # 5 events, within the first epoch
GATE_CONFIGS = [BOUND, BOUND_WHOLE, PER_STEP, PER_STEP_WHOLE]
CALLBACK_KWARGS: dict[str, dict] = {
    NO_EVAL: dict(evaluate=False), DEFAULTS: {}, BOUND: dict(max_metric_drop=0.02),
    BOUND_WHOLE: dict(max_metric_drop=0.02, gate_batches=0), PER_STEP: dict(max_metric_drop=0.02, **PER_STEP_SCHEDULE),
    PER_STEP_WHOLE: dict(max_metric_drop=0.02, gate_batches=0, **PER_STEP_SCHEDULE),
}
TARGETS = {NO_EVAL: 0.08}  # per job, the defaults' target is the job's own (TRAIN_JOBS)
GATE_EVENTS, GATE_PASSES, GATE_SAMPLES = "gate events", "gate passes", "gate samples"
_TIMED = {
    (MaskState, "apply"): "weight masking (after step)",
    (pruning_run, "plan_masks"): "  of which: scores + masks",
}
_ORIGINALS = {(MaskState, "apply"): MaskState.apply, (pruning_run, "plan_masks"): pruning_run.plan_masks}


def _unpatch() -> None:
    for (owner, attribute), original in _ORIGINALS.items():
        setattr(owner, attribute, original)


def pretrained_row_transformer(dm: MNIST5kDataModule, seed: int) -> dict[str, torch.Tensor]:
    """The fine-tune's starting point: ``RowTransformer`` trained one epoch (once, outside the timing)."""
    pl.seed_everything(seed, verbose=False)
    model = RowTransformer()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return {k: v.clone() for k, v in model.state_dict().items()}


def fit_once(config: str, job: dict, epochs: int, seed: int, acc: dict[str, float], root: str
             ) -> tuple[float, float, int]:
    pl.seed_everything(seed, verbose=False)
    model = job["make"]()
    callbacks = []
    if config != "baseline":
        cb = GradientStabilityPruning(sparsity=0.8, **CALLBACK_KWARGS[config])
        _instrument(cb, acc)
        callbacks.append(cb)
    if config == "baseline":
        _unpatch()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,  # the end-of-fit compression report files land in a temporary directory
    )
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the report's console table
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=job["dm"])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if config != "baseline":  # the gate's work per event: passes over data and samples they evaluated
        acc[GATE_EVENTS] += len(cb.history)
        acc[GATE_PASSES] += sum(h.get("gate_passes", 0) for h in cb.history)
        acc[GATE_SAMPLES] += sum(h.get("gate_samples", 0) for h in cb.history)
        acc["delivered metric"] += cb.report.delivered_metric or 0.0
        acc["sparsity"] += cb.current_sparsity()
        job.setdefault("aligned", {})[config] = cb.report.settings["pruning"].get("events_aligned_by")
        job.setdefault("rules", {})[config] = [h.get("gate_evaluation", "") for h in cb.history]
    return elapsed, cpu, trainer.global_step


def training(job: dict, epochs: int, repeats: int, seed: int, configs: list[str] = CONFIGS) -> dict:
    """One job's fit table (baseline, evaluate=False, defaults, and with ``--gate`` the gate's configurations;
    alternating; min of the repeats); returns its figures."""
    evaluate_time = defaultdict(float)
    original_evaluate = evaluation.evaluate

    def timed_evaluate(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return original_evaluate(*args, **kwargs)
        finally:
            evaluate_time["calls"] += 1
            evaluate_time["seconds"] += time.perf_counter() - start

    original_publish = callback_base.CompressionCallback._deliver
    publish_time = defaultdict(float)

    def timed_publish(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return original_publish(*args, **kwargs)
        finally:
            publish_time["seconds"] += time.perf_counter() - start

    evaluation.evaluate = timed_evaluate
    callback_base.CompressionCallback._deliver = timed_publish  # type: ignore[method-assign]
    root = tempfile.TemporaryDirectory(prefix="bench_stats_overhead_")
    times: dict[str, list[float]] = {c: [] for c in configs}
    cpu_times: dict[str, list[float]] = {c: [] for c in configs}  # process CPU seconds: without others' load
    breakdown: dict[str, dict[str, float]] = {c: defaultdict(float) for c in configs}
    steps = 0
    try:
        for config in ("baseline", DEFAULTS):  # warm-up, 1 epoch: first-use imports (the callback's paths with the
            fit_once(config, job, 1, seed, defaultdict(float), root.name)  # defaults' superset), allocator, threads
        for _ in range(repeats):  # alternate configurations so drifting load hits each alike
            for config in configs:
                evaluate_time.clear()
                publish_time.clear()
                elapsed, cpu, steps = fit_once(config, job, epochs, seed, breakdown[config], root.name)
                cpu_times[config].append(cpu)
                if config != "baseline":
                    breakdown[config][END_OF_FIT] += publish_time["seconds"]
                times[config].append(elapsed)
                if config != "baseline":
                    breakdown[config]["  of which: evaluate() passes"] += evaluate_time["seconds"]
                    breakdown[config]["evaluate() calls per fit"] = evaluate_time["calls"]
    finally:
        evaluation.evaluate = original_evaluate
        callback_base.CompressionCallback._deliver = original_publish  # type: ignore[method-assign]
        _unpatch()
        root.cleanup()

    targets = {**TARGETS, DEFAULTS: job["target"]}
    base, cpu_base = min(times["baseline"]), min(cpu_times["baseline"])
    print(f"{job['name']}, batch 64, {epochs} epoch(s) = {steps} optimizer steps, validation each epoch in every "
          f"configuration; {repeats} alternating repeats, min reported; events (defaults): "
          f"{job.get('aligned', {}).get(DEFAULTS)}")
    print(f"{'configuration':<36}{'CPU s (min)':>12}{'overhead':>10}{'wall s (min)':>13}{'overhead':>10}"
          f"{'all repeats, wall s':>28}{'target':>8}")
    overheads: dict[str, float] = {}
    for config in configs:
        best, best_cpu = min(times[config]), min(cpu_times[config])
        overheads[config], overheads[f"{config} (CPU time)"] = best / base - 1, best_cpu / cpu_base - 1
        shown = " ".join(f"{t:.2f}" for t in times[config])
        cpu_over = overheads[f"{config} (CPU time)"]
        target = "" if config not in targets else \
            f"{'ok' if cpu_over <= targets[config] else 'MISSED'} {100 * targets[config]:.0f}%"
        over = "-" if config == "baseline" else f"{100 * cpu_over:+.1f}%"
        wall_over = "-" if config == "baseline" else f"{100 * overheads[config]:+.1f}%"
        print(f"{config:<36}{best_cpu:>12.2f}{over:>10}{best:>13.2f}{wall_over:>10}{shown:>28}{target:>12}")
    print("  (overhead compared with the target: process CPU time, which leaves out the time other processes hold "
          "the cores; wall time beside it)")
    print("time spent inside the callback's code (instrumented wall time, per fit, mean of repeats; ms)")
    order = ["statistics (on_after_backward)", "grad masking (before step)", "weight masking (after step)",
             "pruning events (total)", "  of which: scores + masks", "  of which: evaluate() passes", END_OF_FIT]
    gate = {}
    for config in configs[1:]:
        acc = breakdown[config]
        parts = ", ".join(f"{k.strip()} {1e3 * acc[k] / repeats:.1f}" for k in order if k in acc)
        total = sum(acc[k] for k in order if not k.startswith(" ")) / repeats
        calls = acc.get("evaluate() calls per fit")
        print(f"  {config}: {parts}" + (f" [{calls:.0f} evaluate() calls per fit]" if calls else ""))
        events = acc[GATE_EVENTS] / repeats
        gate[config] = dict(events_per_fit=events, passes_per_event=acc[GATE_PASSES] / max(acc[GATE_EVENTS], 1),
                            samples_per_event=acc[GATE_SAMPLES] / max(acc[GATE_EVENTS], 1),
                            delivered_metric=acc["delivered metric"] / repeats, sparsity=acc["sparsity"] / repeats)
        print(f"  {'':<{len(config)}}  gate: {events:.0f} events per fit, {gate[config]['passes_per_event']:.2f} "
              f"evaluation passes and {gate[config]['samples_per_event']:.0f} samples per event; delivered "
              f"{gate[config]['delivered_metric']:.4f} val metric at sparsity {gate[config]['sparsity']:.3f}")
        report = acc.get(END_OF_FIT, 0.0) / repeats
        print(f"  {'':<{len(config)}}  => {1e3 * total:.0f} ms = {100 * total / base:.1f}% of the baseline fit "
              f"({100 * (total - report) / base:.1f}% without the end-of-fit report, {1e3 * report:.0f} ms)")
        overheads[f"{config} (instrumented)"] = total / base
        overheads[f"{config} (instrumented, no report)"] = (total - report) / base
    rules = job.pop("rules", {})
    for config, last in rules.items():
        print(f"  gate rules of the last fit, {config.strip()}: {' | '.join(last) or '-'}")
    aligned = job.pop("aligned", {})
    return dict(job=job["name"], epochs=epochs, steps=steps, repeats=repeats, seconds=times, cpu_seconds=cpu_times,
                min_seconds={c: min(t) for c, t in times.items()}, overhead=overheads, gate=gate,
                events_aligned_by=aligned.get(DEFAULTS), events_aligned_by_config=aligned, rules_last_fit=rules,
                targets=targets)


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and 1 epoch (about 40 s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on shared cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true", help="part 1 only")
    parser.add_argument("--skip-transformer", action="store_true", help="part 2 without the transformer fine-tune")
    parser.add_argument("--skip-micro", action="store_true", help="part 2 only")
    parser.add_argument("--skip-smallcnn", action="store_true", help="part 2 without the SmallCNN job")
    parser.add_argument("--epochs", type=int, nargs="+", default=None,
                        help="part 2's fit lengths (default: 4, --quick: 1), each its own table")
    parser.add_argument("--gate", action="store_true",
                        help="part 2 also with a bound, default and explicit per-step schedules, each beside "
                             "gate_batches=0 (the whole set before and after every event)")
    parser.add_argument("--repeats", type=int, default=None, help="part 2's repeats per configuration")
    parser.add_argument("--profile", action="store_true", help="print the top operators of each update mode")
    parser.add_argument("--before", metavar="REV", default=None,
                        help="also time the statistics at git revision REV against the current ones (CPU time)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the per-weight step on the MLP (first compile: ~0.5 min)")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's adaptive malloc thresholds")
    parser.add_argument("--json", type=Path, default=RESULTS / "stats_overhead.json", help="where the figures go")
    args = parser.parse_args()

    allocator = "glibc defaults" if args.default_malloc else pin_glibc_malloc()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_compress"):
        logging.getLogger(name).setLevel(logging.ERROR)

    micro_repeats = 5 if args.quick else 11
    train_epochs, train_repeats = (1, 1) if args.quick else (4, 3)
    train_repeats = args.repeats or train_repeats
    fit_lengths = args.epochs or [train_epochs]
    configs = CONFIGS + GATE_CONFIGS if args.gate else CONFIGS
    print(f"bench_stats_overhead: torch {torch.__version__}, lightning {pl.__version__}, python "
          f"{platform.python_version()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"os.cpu_count()={os.cpu_count()}, torch.set_num_threads({args.threads}) "
          f"-> get_num_threads()={torch.get_num_threads()}, {'quick' if args.quick else 'full'} run, "
          f"allocator: {allocator}")
    print("load average before the run (1/5/15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
          + " -- other processes on these cores inflate and scatter every figure below")
    t0 = time.perf_counter()

    print(f"\n[1] GradientStatistics.update vs Adam(foreach=True).step on the same tracked weights "
          f"(median of {micro_repeats} alternating blocks; update amortized over 32 steps incl. one per-unit merge)")
    torch.manual_seed(args.seed)
    mlp_name = "MLP " + "-".join(map(str, [784, *MLP_HIDDEN, 10]))
    rows = []
    if not args.skip_micro:
        rows += micro("SmallCNN 28x28", SmallCNN(), micro_repeats, profile=args.profile)
        rows += micro(TRANSFORMER_NAME, RowTransformer(), micro_repeats, profile=args.profile)
        rows += micro(mlp_name, MLPClassifier(784, MLP_HIDDEN), micro_repeats, profile=args.profile)
        print_micro(rows)
    compiled = compiled_step(mlp_name, MLPClassifier(784, MLP_HIDDEN), micro_repeats) if args.compile else None
    before = None
    if args.before is not None:
        print(f"\n[1b] statistics update before ({args.before}) and after, thread CPU time, median of {micro_repeats} "
              "alternating blocks (ratio: to Adam, paired)")
        before_cls = load_before(args.before)
        models = {"SmallCNN 28x28": SmallCNN, TRANSFORMER_NAME: RowTransformer,
                  mlp_name: functools.partial(MLPClassifier, 784, MLP_HIDDEN)}
        before = dict(revision=args.before, rows=[row for name, make in models.items()
                                                  for row in before_after(name, make(), before_cls, micro_repeats)])

    fits: list[dict] = []
    if not args.skip_training:
        print("\n[2] Trainer.fit overhead of GradientStabilityPruning(sparsity=0.8) (unstructured, per-weight stats)")
        dm = PreloadedMNIST5k(batch_size=64, seed=0)
        jobs = [] if args.skip_smallcnn else [
            dict(name="SmallCNN on MNIST5k from scratch (3,500 train / 750 val images)", make=SmallCNN, dm=dm,
                 target=0.25, repeats=train_repeats)]
        if not args.skip_transformer:
            start = pretrained_row_transformer(dm, args.seed)

            def fine_tuned() -> RowTransformer:
                model = RowTransformer()
                model.load_state_dict(start)
                return model

            jobs.append(dict(name=f"{TRANSFORMER_NAME} fine-tune on MNIST5k rows (1 epoch pre-trained, outside "
                             "the timing)", make=fine_tuned, dm=dm, target=0.20,
                             repeats=max(1, train_repeats - 1)))
        for job in jobs:
            for epochs in fit_lengths:
                fits.append(training(dict(job), epochs, job["repeats"], args.seed, configs))
                print()

    print("load average after the run: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"\nverdicts (total bench time {time.perf_counter() - t0:.0f} s):")
    for r in rows:
        ok = r["ratio"] <= MICRO_TARGET
        verdict = "INFO" if r["mode"] == EVERY_STEP else "PASS" if ok else "FAIL"
        print(f"  {verdict}  update/Adam <= {MICRO_TARGET}x  {r['model']}, {r['mode']}: "
              f"{r['ratio']:.2f}x in CPU time ({r['ratio_wall']:.2f}x in wall time)")
    for fit in fits:
        for config in (NO_EVAL, DEFAULTS):
            cpu, wall = fit["overhead"][f"{config} (CPU time)"], fit["overhead"][config]
            target = fit["targets"][config]
            print(f"  {'PASS' if cpu <= target else 'FAIL'}  fit overhead <= {100 * target:.0f}%  {fit['job']}, "
                  f"{config}: {100 * cpu:+.1f}% in process CPU time ({100 * wall:+.1f}% wall); gate "
                  f"{fit['gate'][config]['events_per_fit']:.0f} events per fit, "
                  f"{fit['gate'][config]['passes_per_event']:.2f} passes and "
                  f"{fit['gate'][config]['samples_per_event']:.0f} samples per event")
    write_json(args.json, dict(benchmark="stats_overhead", machine=machine_info(args.quick), allocator=allocator,
                               micro=[r for r in rows if r["mode"] != EVERY_STEP],
                               micro_every_step=[r for r in rows if r["mode"] == EVERY_STEP],  # info, no target
                               compiled=compiled, before_after=before, fit=fits,
                               seconds=time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
