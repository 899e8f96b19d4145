"""Run every benchmark one after another, then rebuild ``results/summary.md`` and README's results section.

    python benchmarks/run_all.py                      # `make bench`: full mode, README updated
    python benchmarks/run_all.py --quick              # `make bench-quick`: into results/quick/, README untouched
    python benchmarks/run_all.py --only structured    # re-run one; the summary reuses the others' JSON
    python benchmarks/run_all.py --summary-only       # rebuild summary + README from the JSON files alone

Each benchmark runs as a subprocess (``sys.executable``, output streamed) and leaves a JSON file of its figures; the
summary is built from those files alone. Full mode = every script's own defaults: about 14 min on 2 idle cores
(sparsity 5-7 min, gptq_models 4 min, the others 1-2 min each). A missed target is a FAIL in the summary, not an
error: the exit status is 1 only when a benchmark script fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # `_timing`, when run as a script or imported by the tests
from _timing import RESULTS, machine_info  # noqa: E402

README = HERE.parent / "README.md"
NAMES = ("sparsity", "stats_overhead", "structured", "quantization", "serving", "minilm", "gptq_models")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# Targets from the issues (points of test accuracy, fractions, speed-up factors).
STATS_RATIO = 0.3  # statistics update <= 0.3 x Adam step
FIT_OVERHEAD = 0.10  # Trainer.fit with the callback (evaluate=False) <= 10 % slower than without
VS_DENSE_AT_95 = 1.0  # default criterion at 95 % within 1.0 pt of dense
VS_LIGHTNING_AT_99 = 3.0  # default criterion at 99 % >= ModelPruning + 3.0 pt
STRUCTURED_SPEEDUP = 1.7  # compacted >= 1.7 x faster than dense at batch 64 ...
STRUCTURED_DROP = 1.5  # ... with <= 1.5 pt accuracy drop
DEFAULT_CRITERION, LIGHTNING, DENSE = "weighted_stability", "ModelPruning", "dense"


# ---------------------------------------------------------------------------------------------- running
def command(name: str, quick: bool, results: Path) -> list[str]:
    out = ["--out", str(results / "sparsity.md")] if name == "sparsity" else ["--json", str(results / f"{name}.json")]
    return [sys.executable, str(HERE / f"bench_{name}.py"), *(["--quick"] if quick else []), *out]


def run(names: Sequence[str], quick: bool, results: Path) -> dict[str, tuple[int, float]]:
    """Each benchmark in turn, output streamed; name -> (exit status, seconds)."""
    done = {}
    for i, name in enumerate(names, 1):
        cmd = command(name, quick, results)
        print(f"\n===== [{i}/{len(names)}] {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=HERE.parent, check=False).returncode
        done[name] = (rc, time.perf_counter() - start)
        print(f"===== {name}: exit {rc}, {done[name][1]:.0f} s", flush=True)
    return done


def load(name: str, results: Path) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if "machine" not in data:  # bench_sparsity's JSON: the file's date, the mode from its header line
        data["machine"] = {"date": file_date(path), "mode": "quick" if "quick run" in data["header"][0] else "full"}
    return data


def file_date(path: Path) -> str:
    """When ``path`` was written: its last commit's date when git knows it and it has not changed since (a fresh
    checkout's mtime is the checkout's), else its modification time."""
    mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    status = subprocess.run(["git", "status", "--porcelain", "--", str(path)], cwd=HERE, capture_output=True,
                            text=True, check=False)
    if status.returncode != 0 or status.stdout.strip():
        return mtime  # not in git, or changed since its last commit
    log = subprocess.run(["git", "log", "-1", "--format=%cI", "--", str(path)], cwd=HERE, capture_output=True,
                         text=True, check=False)
    committed = log.stdout.strip()
    if log.returncode != 0 or not committed:
        return mtime
    return datetime.datetime.fromisoformat(committed).replace(tzinfo=None).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- summary
def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [head, ["---"] + ["---:"] * (len(head) - 1), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "**FAIL**"


HEAD = ["figure", "ours", "baseline (same run)", "result", "target", "verdict"]


def stats_section(d: dict[str, Any]) -> list[str]:
    rows = [[f"statistics update, {r['model']}, {r['mode']}", f"{r['stats_ms']:.3f} ms",
             f"Adam step {r['adam_ms']:.3f} ms", f"{r['ratio']:.2f}×", f"≤ {STATS_RATIO:g}×",
             verdict(r["ratio"] <= STATS_RATIO)] for r in d["micro"]]
    fits = d.get("fit") or []
    for fit in [fits] if isinstance(fits, dict) else fits:  # one SmallCNN dict before issue 21's jobs list
        best, over = fit["min_seconds"], fit["overhead"]
        job = f" ({fit['job'].split(' (')[0]})" if "job" in fit else ""
        for config, target in (fit.get("targets") or {"callback, evaluate=False": FIT_OVERHEAD}).items():
            cpu = over.get(f"{config} (CPU time)", over[config])
            rows.append([f"`Trainer.fit`{job}, {config}", f"{best[config]:.2f} s wall",
                         f"no callback {best['baseline']:.2f} s", f"{100 * cpu:+.1f} % CPU",
                         f"≤ {100 * target:g} %", verdict(cpu <= target)])
    return [table(HEAD, rows)]


def group_accuracy(runs: list[dict[str, Any]]) -> dict[tuple[str, float], tuple[float, float]]:
    """(method, level) -> (mean, sample std) of the test accuracy over seeds (std 0 with one seed)."""
    groups: dict[tuple[str, float], list[float]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r["test_acc"])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in groups.items()}


def sparsity_section(d: dict[str, Any]) -> list[str]:
    acc = group_accuracy(d["runs"])

    def cell(method: str, level: float) -> str:
        x = acc.get((method, level))
        return "–" if x is None else f"{x[0]:.2f} ± {x[1]:.2f} %"

    def check(level: float, base: str, base_level: float, margin: float) -> list[str]:
        ours, theirs = acc.get((DEFAULT_CRITERION, level)), acc.get((base, base_level))
        diff = None if ours is None or theirs is None else ours[0] - theirs[0]
        return [f"test accuracy at {100 * level:g} % sparsity", cell(DEFAULT_CRITERION, level),
                f"{base} {cell(base, base_level)}", "–" if diff is None else f"{diff:+.2f} pt", f"≥ {margin:+g} pt",
                verdict(None if diff is None else diff >= margin)]

    levels = sorted(s for m, s in acc if m == DEFAULT_CRITERION and (LIGHTNING, s) in acc)
    gaps = {s: acc[(DEFAULT_CRITERION, s)][0] - acc[(LIGHTNING, s)][0] for s in levels}
    below = [f"{100 * s:g} %" for s in levels if gaps[s] + acc[(DEFAULT_CRITERION, s)][1] + acc[(LIGHTNING, s)][1] < 0]
    rows = [check(0.95, DENSE, 0.0, -VS_DENSE_AT_95), check(0.99, LIGHTNING, 0.99, VS_LIGHTNING_AT_99),
            ["levels below ModelPruning beyond the seed spread", ", ".join(below) or "none",
             f"ModelPruning, {len(levels)} levels", f"{len(below)} of {len(levels)}", "none",
             verdict(not below if levels else None)]]
    seeds = len({r["seed"] for r in d["runs"]})
    quick = "quick/" if d["machine"].get("mode") == "quick" else ""
    return [table(HEAD, rows), "", (
        f"`{DEFAULT_CRITERION}` (the default criterion) minus ModelPruning (global L1), mean of {seeds} seed(s): "
        + ", ".join(f"{100 * s:g} %: {g:+.2f} pt" for s, g in gaps.items())
        + f". Below: mean + std under ModelPruning's mean - std. Every criterion: `benchmarks/results/{quick}"
        "sparsity.md`.")]


def structured_section(d: dict[str, Any]) -> list[str]:
    f = d["figures"]

    def pair(key: str, spec: str, scale: float = 1.0) -> list[str]:
        return [spec.format(f[key]["compacted"] / scale), "dense " + spec.format(f[key]["dense"] / scale)]

    def ratio(key: str) -> float:
        return f[key]["dense"] / f[key]["compacted"]

    speedup, acc = ratio("latency batch 64 (ms)"), f["test accuracy (%)"]
    drop = acc["dense"] - acc["compacted"]
    rows = [
        ["latency, batch 64", *pair("latency batch 64 (ms)", "{:.3f} ms"), f"{speedup:.2f}× faster",
         f"≥ {STRUCTURED_SPEEDUP:g}×", verdict(speedup >= STRUCTURED_SPEEDUP)],
        ["test accuracy after fine-tuning", *pair("test accuracy (%)", "{:.2f} %"), f"{drop:+.2f} pt drop",
         f"≤ {STRUCTURED_DROP:g} pt drop", verdict(drop <= STRUCTURED_DROP)],
        ["latency, batch 1", *pair("latency batch 1 (ms)", "{:.3f} ms"),
         f"{ratio('latency batch 1 (ms)'):.2f}× faster", "–", "info"],
        ["parameters", *pair("parameters", "{:,.0f}"), f"{ratio('parameters'):.2f}× fewer", "–", "info"],
        ["MACs / image", *pair("MACs / image", "{:.2f} M", 1e6), f"{ratio('MACs / image'):.2f}× fewer", "–", "info"],
    ]
    return [table(HEAD, rows), "", (
        f"SmallCNN(channels={d['arch']['channels']}, hidden={d['arch']['hidden']}), {d['fraction']:.0%} of the units "
        f"of every prunable layer removed (L2 norm), {d['epochs']} training + {d['finetune']} fine-tuning epochs; "
        f"latency median at {d['latency_threads']} thread(s).")]


def quantization_section(d: dict[str, Any]) -> list[str]:
    base = d["mlp"][0]  # fp32
    mlp = [[r["scheme"], r["kernels"], f"{r['acc']:.2f} ({base['acc'] - r['acc']:+.2f})",
            "–" if not r["bytes"] else f"{r['bytes'] / 1e6:.2f} ({r['bytes'] / base['bytes']:.3f}×)",
            f"{r['latency_ms']:.3f} ({base['latency_ms'] / r['latency_ms']:.2f}×)"] for r in d["mlp"]]
    grid: dict[str, dict[str, float]] = {}
    for s in d["transformer"]["schemes"]:
        bits, _, scheme = s["scheme"].removesuffix(" asym").partition(" ")
        grid.setdefault(bits, {})[scheme] = s["acc"]
    columns = list(dict.fromkeys(c for row in grid.values() for c in row))
    t, q = d["transformer"], d["quantize_time"]
    return [
        "MLP 784-1792-1792-10, batch-64 CPU latency (baseline: the fp32 row):", "",
        table(["scheme", "kernels", "test acc % (drop pt)", "file MB (× fp32)", "ms / batch 64 (speed-up)"], mlp), "",
        f"2-layer TransformerEncoder, test accuracy % (fp32 {t['fp32_acc']:.2f}; 3/2 bits asymmetric):", "",
        table(["bits", *columns], [[b, *(f"{row[c]:.2f}" if c in row else "–" for c in columns)]
                                   for b, row in grid.items()]), "",
        (f"`quantize()` of a {q['params'] / 1e6:.1f}M-parameter model: int8 per-channel {q['int8_minmax_s']:.2f} s, "
         f"int4 g128 MSE calibration {q['int4_g128_mse_s']:.2f} s."),
    ]


def serving_section(d: dict[str, Any]) -> list[str]:
    rows = [[c["check"], c["value"], c["target"], verdict(c["pass"])] for c in d["checks"]]
    return [table(["check", "measured", "target", "verdict"], rows), "",
            f"CPU capability {d['machine']['cpu_capability']}, {d['threads']} thread(s), "
            f"onnxruntime {d['machine']['onnxruntime']}."]


def minilm_section(d: dict[str, Any]) -> list[str]:
    rows = [[r["scheme"], f"{r['min_cos']:.4f}", f"{r['mean_cos']:.4f}", f"{r['nn_agreement']:.2f}",
             f"{r['file_ratio']:.3f}x", f"{r['seconds']:.1f}", r["verdict"]] for r in d["schemes"]]
    acts = "; ".join(f"{r['scheme']}: min cos {r['min_cos']:.4f}" for r in d.get("int8_activations", []))
    guarded = [f"{r['scheme']}: held-out min cos {r['guard']['before']:.4f} -> {r['guard']['after']:.4f}, "
               f"{r['guard']['promoted']} layers promoted; weights "
               + ", ".join(f"{w} {100 * f:.0f} %" for w, f in r["bits"].items())
               for r in d["schemes"] if r.get("guard")]
    return [f"all-MiniLM-L6-v2, {d['sentences']} sentences, embedding cosine vs fp32; calibration "
            f"{d['calibration_texts']} other texts. CPU capability {d['machine'].get('cpu_capability', '?')}.", "",
            table(["scheme", "min cos", "mean cos", "NN agree", "file vs fp32", "time s", "verdict"], rows), "",
            *([f"Guarded rows (`metric_fn` = min cosine on held-out sentences, mixed precision): {'; '.join(guarded)}.",
               ""] if guarded else []),
            f"int8 activations: {acts}."]


def gptq_models_section(d: dict[str, Any]) -> list[str]:
    """One row per (model, bits, grouping): RTN and GPTQ side by side."""
    by = {(r["model"], r["scheme"]): r for r in d["rows"]}
    rows = []
    for r in d["rows"]:
        if r["method"] != "rtn":
            continue
        g = by[(r["model"], r["scheme"].replace("RTN", "GPTQ"))]
        kept = f" ({100 * r['float_kept_share']:.1f} % float)" if r["float_kept_share"] else ""
        rows.append([r["model"], r["scheme"].removesuffix(" RTN") + kept,
                     f"{r['acc']:.2f} ({0.0 - r['drop']:+.2f})", f"{g['acc']:.2f} ({0.0 - g['drop']:+.2f})",
                     f"{r['logit_rel_err']:.3f} / {g['logit_rel_err']:.3f}", f"{r['file_ratio']:.3f}×",
                     f"{r['seconds']:.2f} / {g['seconds']:.1f}"])
    fp32 = ", ".join(f"{name} {m['fp32_acc']:.2f} %" for name, m in d["models"].items())
    images = next(iter(d["models"].values()))["calibration_images"]
    return [f"Test accuracy % (change vs fp32, pt) on MNIST-5k's 750 test images; fp32: {fp32}. Asymmetric, MSE "
            f"clipping; GPTQ calibrated on {images} training images. CPU capability "
            f"{d['machine'].get('cpu_capability', '?')}.", "",
            table(["model", "scheme", "RTN", "GPTQ", "logit error RTN / GPTQ", "file vs fp32",
                   "quantize() s RTN / GPTQ"], rows), "",
            f"GPTQ below RTN in accuracy: {', '.join(d['gptq_below_rtn']) or 'nowhere'}; in logit error "
            f"(‖L − L_fp32‖ / ‖L_fp32‖ on the test images): {', '.join(d['gptq_logit_err_above_rtn']) or 'nowhere'}."]


SECTIONS = {  # name -> (title, builder), in NAMES order
    "sparsity": ("Accuracy vs sparsity (SmallCNN, MNIST-5k)", sparsity_section),
    "stats_overhead": ("Gradient-statistics overhead", stats_section),
    "structured": ("Structured pruning + compaction", structured_section),
    "quantization": ("Post-training quantization", quantization_section),
    "serving": ("Serving: ONNX Runtime int8 vs fp32 vs ORT's own quantization", serving_section),
    "minilm": ("Quantizing a real transformer (all-MiniLM-L6-v2)", minilm_section),
    "gptq_models": ("GPTQ vs round-to-nearest on a BERT classifier and a ResNet-18 (MNIST-5k)", gptq_models_section),
}


def build_summary(data: dict[str, dict[str, Any] | None], quick: bool = False, ran: Sequence[str] = (),
                  seconds: float | None = None, machine: dict[str, Any] | None = None) -> str:
    """The Markdown block: machine header, then one table per benchmark (``data``: name -> its JSON or None)."""
    m = machine or machine_info()
    make = "make bench-quick" if quick else "make bench"
    note = f"All figures come from one run of `{make}`"
    dates = sorted(str(d["machine"]["date"]) for d in data.values()
                   if isinstance(d, dict) and isinstance(d.get("machine"), dict) and d["machine"].get("date"))
    spread = (datetime.datetime.fromisoformat(dates[-1]) - datetime.datetime.fromisoformat(dates[0])) if dates else None
    if spread is not None and spread.total_seconds() > 2700:
        note = (f"Sections come from `{make}` and from re-runs of single sections since (`benchmarks/run_all.py "
                f"--only NAME`), {dates[0][:16].replace('T', ' ')} to {dates[-1][:16].replace('T', ' ')}: each date "
                "is under its title")
    elif ran and set(ran) != set(NAMES):
        note += f"; {', '.join(ran)} re-run since (`benchmarks/run_all.py --only/--skip`), dates under each title"
    elif ran and seconds is not None:
        note += f" ({seconds / 60:.1f} min)"
    note += ". Smoke mode: fewer seeds, epochs and repeats, not reference figures." if quick else "."
    capability = next((d["machine"].get("cpu_capability") for d in data.values()
                       if isinstance(d, dict) and isinstance(d.get("machine"), dict)
                       and d["machine"].get("cpu_capability")), None)
    cores = f"{m['cpu_count']} cores" + (f" (CPU capability {capability})" if capability else "")
    cpus = {d["machine"]["cpu"] for d in data.values()
            if isinstance(d, dict) and isinstance(d.get("machine"), dict) and d["machine"].get("cpu")}
    head = (f"Machines: {', '.join(sorted(cpus))}, {cores}, torch {m['torch']}, lightning {m['lightning']}: each "
            "section names its CPU under its title" if len(cpus) > 1 else
            f"Machine: {m['cpu']}, {cores}, torch {m['torch']}, lightning {m['lightning']}, {m['date'][:10]}")
    lines = [f"{head}. {note}"]
    for name, (title, builder) in SECTIONS.items():
        d, lines = data.get(name), [*lines, "", f"### {title}", ""]
        if d is None:
            lines.append(f"_Not measured yet: `python benchmarks/run_all.py --only {name}`._")
        else:
            cpu = f" on {d['machine']['cpu']}" if len(cpus) > 1 and d["machine"].get("cpu") else ""
            when = f"{d['machine']['date'].replace('T', ' ')}{cpu}, {d['machine'].get('mode', 'full')} mode"
            lines += [f"_`benchmarks/bench_{name}.py`, measured {when}._", "", *builder(d)]
    return "\n".join(lines) + "\n"


def update_readme(text: str, block: str) -> str:
    """``block`` between the markers; the markers (and a "## Benchmark results" section) are added if absent,
    before a License / Contributing / Development section or at the end."""
    if START in text and END in text:
        before, rest = text.split(START, 1)
        return f"{before}{START}\n{block.strip()}\n{END}{rest.split(END, 1)[1]}"
    section = ("## Benchmark results\n\n`make bench` runs every benchmark in `benchmarks/` in full mode "
               "(about 10 min on 2 idle cores),\nwrites `benchmarks/results/*.json` and `summary.md`, and rewrites "
               "this section. `make bench ARGS=\"--only structured\"`\nre-runs one and keeps the others' figures; "
               "`make bench-quick` is a smoke run into `benchmarks/results/quick/`\nthat leaves this section alone.\n\n"
               f"{START}\n{block.strip()}\n{END}\n")
    found = re.search(r"^## (Licen[cs]e|Contributing|Development)\b", text, re.MULTILINE)
    if found:
        return f"{text[:found.start()]}{section}\n{text[found.start():]}"
    return f"{text.rstrip()}\n\n{section}"


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark with --quick, into results/quick/")
    parser.add_argument("--only", action="append", choices=NAMES, default=[], help="run only this one (repeatable)")
    parser.add_argument("--skip", action="append", choices=NAMES, default=[], help="do not run this one (repeatable)")
    parser.add_argument("--summary-only", action="store_true", help="run nothing: rebuild from the JSON files")
    parser.add_argument("--readme", type=Path, default=None,
                        help=f"README to update (default {README.name} in full mode, none with --quick)")
    args = parser.parse_args(argv)
    results = RESULTS / "quick" if args.quick else RESULTS
    names = [] if args.summary_only else [n for n in (args.only or NAMES) if n not in args.skip]

    start = time.perf_counter()
    done = run(names, args.quick, results)
    summary = build_summary({n: load(n, results) for n in NAMES}, args.quick, names, time.perf_counter() - start)
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.md").write_text(summary)
    print(f"\n{summary}\nwritten: {results / 'summary.md'}")
    readme = args.readme or (None if args.quick else README)
    if readme is not None:
        readme.write_text(update_readme(readme.read_text(), summary))
        print(f"updated: {readme}")
    print("\n".join(f"  {name:<15} exit {rc}  {secs:6.0f} s" for name, (rc, secs) in done.items()))
    failed = [n for n, (rc, _) in done.items() if rc != 0]
    print(f"FAILED (stale or missing figures in the summary): {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
