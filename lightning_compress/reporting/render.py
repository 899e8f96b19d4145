"""The report's renderings: a rich console view, Markdown, JSON and a matplotlib figure, from a summary
(:func:`lightning_compress.reporting.summary.summarize`). No Lightning import, no file written here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.reporting.budget_frontier import frontier_line


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # unreachable


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _fmt_bits(bits: int) -> str:
    return "fp32" if bits >= FLOAT_BITS else f"int{bits}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _fmt_drop(drop: float | None) -> str:
    """A drop in the metric's units, shown as a change: "-0.0120" is worse by 0.012."""
    return "-" if drop is None else f"{-drop:+.4f}"


def pruning_line(entry: Mapping[str, Any], metric: str, sparsity: float, structured: bool,
                 per_layer: Mapping[str, float] | None = None, estimate: Mapping[str, Any] | None = None) -> str:
    """The console line of one pruning event (``per_layer``: verbose=2; ``estimate``: the metric after the step was
    estimated on part of the set, and the line says so)."""
    after = "" if entry["metric_after"] is None else _fmt_metric(entry["metric_after"])
    if estimate is not None and after:
        after = f"~{after} (estimated on {estimate['samples']} of {estimate['population']} samples)"
    shown = after and f", {metric} {_fmt_metric(entry['metric_before'])} -> {after}"
    layers = f" ({', '.join(f'{n} {s:.0%}' for n, s in per_layer.items())})" if per_layer else ""
    return (f"GradientStabilityPruning: step {entry['step']}: sparsity {sparsity:.3f}{' (units)' if structured else ''}"
            f"{shown}{'' if entry['accepted'] else ' (rolled back)'}{layers}")


def headline_parts(summary: Mapping[str, Any]) -> list[str]:
    """What the run delivered, each figure saying what it is: the delivered model's metric, the cost of each
    compression step compared like with like, the size and the sparsity."""
    name = summary["metric_name"] or "metric"
    delivered = summary["delivered"]
    parts = [f"FAILED, nothing delivered: {summary['failure']}"] if summary.get("failure") else []
    if delivered["val"] is not None:
        test = f", {_fmt_metric(delivered['test'])} test" if delivered["test"] is not None else ""
        parts.append(f"delivered {name} {_fmt_metric(delivered['val'])} val{test}")
    quant = summary["quantization"]
    if quant is not None and quant["metric_float"] is not None:
        parts.append(f"quantization: float {_fmt_metric(quant['metric_float'])} -> quantized "
                     f"{_fmt_metric(quant['metric_quantized'])} ({_fmt_drop(quant['metric_drop'])})")
    prune = summary["pruning"]
    if prune is not None:
        worst = prune["largest_accepted_drop"]
        gate = summary.get("gate", {}).get("pruning", {})
        asked = (f"target {gate['target_sparsity']:.2f}, delivered {gate['delivered_sparsity']:.2f}, "
                 if gate.get("shortfall") else "")  # a fit that under-delivered says so first
        parts.append(f"pruning: {asked}{prune['events']} steps, {prune['rolled_back']} rolled back"
                     + (f", costliest kept step {_fmt_drop(worst)}" if worst is not None else ""))
    source = "export file" if summary["bytes_source"] == "file" else "estimate"
    parts.append(f"size {_fmt_bytes(summary['bytes_fp32'])} -> {_fmt_bytes(summary['bytes_compressed'])} "
                 f"({_fmt_ratio(summary['compression_ratio'])}, {source})")
    parts.append(f"pruned {summary['sparsity']:.1%} of the weights")
    return parts


def headline(summary: Mapping[str, Any]) -> str:
    return "; ".join(headline_parts(summary))


def _layer_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, layer in summary["layers"].items():
        rows.append([
            name,
            f"{layer['parameters']:,}",
            f"{layer['sparsity']:.1%}",
            _fmt_bits(layer["bits"]),
            _fmt_bytes(layer["bytes_fp32"]),
            _fmt_bytes(layer["bytes_compressed"]),
            _fmt_ratio(layer["ratio"]),
            layer["note"],
        ])
    other = summary["other_state"]
    if other["entries"]:
        rows.append([
            f"(other state: {other['entries']} entries)", "", "", "fp32",
            _fmt_bytes(other["bytes_fp32"]), _fmt_bytes(other["bytes_compressed"]), "",
            "not compressed" if other["bytes_fp32"] == other["bytes_compressed"] else "compacted",
        ])
    rows.append([
        "total", "", f"{summary['sparsity']:.1%}", "",
        _fmt_bytes(summary["bytes_fp32"]), _fmt_bytes(summary["bytes_compressed"]),
        _fmt_ratio(summary["compression_ratio"]), "whole model",
    ])
    return rows


LAYER_COLUMNS = ["layer", "weights", "sparsity", "bits", "bytes fp32", "bytes compressed", "ratio", "note"]
EVENT_COLUMNS = ["#", "kind", "step", "metric before", "metric after", "reference", "change vs reference",
                 "pruned", "accepted", "note"]


def _fmt_after(event: Mapping[str, Any]) -> str:
    """The metric after a step, or, where the gate stopped early, its estimate marked as one (never as measured)."""
    estimate = event.get("metric_after_estimate")  # absent from summaries written before estimates were kept
    if event["metric_after"] is not None or not estimate:
        return _fmt_metric(event["metric_after"])
    return f"~{_fmt_metric(estimate['value'])} (estimated on {estimate['samples']} of {estimate['population']} samples)"


def _event_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    return [
        [
            str(i), e["kind"], str(e["step"]), _fmt_metric(e["metric_before"]), _fmt_after(e),
            _fmt_metric(e["reference"]), _fmt_drop(e["metric_drop"]),
            "-" if e["sparsity"] is None else f"{e['sparsity']:.1%}",
            "yes" if e["accepted"] else ("over bound" if e["kind"] == "quantize" else "rolled back"), e["note"],
        ]
        for i, e in enumerate(summary["events"], 1)
    ]


def _quantized(summary: Mapping[str, Any]) -> bool:
    return any(e["kind"] == "quantize" for e in summary["events"]) or any(
        v["bits"] < FLOAT_BITS for v in summary["layers"].values()
    )


def _fallback_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    columns: list[str] = []
    for fallback in summary["fallbacks"]:
        columns += [k for k in fallback if k not in columns]
    return columns, [[_fmt_value(f.get(c)) for c in columns] for f in summary["fallbacks"]]


def render_console(summary: Mapping[str, Any]) -> Any:
    """A rich renderable (title, the three tables, notes)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text("lightning-compress report: " + headline(summary), style="bold")]
    layers = Table(title="Layers", box=box.SIMPLE_HEAD, title_justify="left")
    for i, column in enumerate(LAYER_COLUMNS):
        layers.add_column(column, justify="left" if i in (0, 3, 7) else "right")
    rows = _layer_rows(summary)
    for i, row in enumerate(rows):
        layers.add_row(*row, style="bold" if i == len(rows) - 1 else None, end_section=i == len(rows) - 2)
    parts.append(layers)
    if summary["events"]:
        events = Table(title="Compression steps", box=box.SIMPLE_HEAD, title_justify="left")
        for column in EVENT_COLUMNS:
            events.add_column(column, justify="left" if column in ("kind", "accepted", "note") else "right")
        for row in _event_rows(summary):
            events.add_row(*row)
        parts.append(events)
    columns, fallback_rows = _fallback_table(summary)
    if fallback_rows:
        fallbacks = Table(title="Quantization fallbacks", box=box.SIMPLE_HEAD, title_justify="left")
        for column in columns:
            fallbacks.add_column(column)
        for row in fallback_rows:
            fallbacks.add_row(*row)
        parts.append(fallbacks)
    elif _quantized(summary):
        parts.append(Text("Quantization fallbacks: none"))
    line = frontier_line(summary)
    if line is not None:
        parts.append(Text(line))
    for key, file in summary["files"].items():
        parts.append(Text(f"{key}: {file['path']} ({_fmt_bytes(file['bytes'])})", style="dim"))
    for note in summary["notes"]:
        parts.append(Text(f"Note: {note}", style="italic"))
    return Group(*parts)


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(summary: Mapping[str, Any], plot_name: str | None = None) -> str:
    parts = ["# Compression report", "", headline(summary), ""]
    parts += [f"- {part}" for part in headline_parts(summary)] + [
        f"- metric: {summary['metric_description'] or summary['metric_name'] or '-'}",
        f"- bytes (fp32, whole model): {summary['bytes_fp32']:,}",
        f"- bytes (compressed, {summary['bytes_source']}): {summary['bytes_compressed']:,}",
        f"- compression ratio: {_fmt_ratio(summary['compression_ratio'])}",
        f"- pruned weights: {summary['sparsity']:.2%}"
        + ("" if summary["zeros_after_rounding"] is None
           else f"; codes rounded to zero by quantization: {summary['zeros_after_rounding']:.2%}"),
        *([f"- {line}"] if (line := frontier_line(summary)) is not None else []),
        "",
        "## Layers",
        "",
        _md_table(LAYER_COLUMNS, _layer_rows(summary)),
        "",
        "## Compression steps",
        "",
        _md_table(EVENT_COLUMNS, _event_rows(summary)) if summary["events"] else "No compression step recorded.",
        "",
        "## Quantization fallbacks",
        "",
    ]
    columns, rows = _fallback_table(summary)
    if rows:
        parts.append(_md_table(columns, rows))
    else:
        parts.append("None." if _quantized(summary) else "No quantization in this run.")
    if summary["files"]:
        parts += ["", "## Files", ""] + [
            f"- {key}: `{file['path']}` ({_fmt_bytes(file['bytes'])})" for key, file in summary["files"].items()
        ]
    if plot_name:
        parts += ["", f"![compression report]({plot_name})"]
    parts += ["", "## Notes", ""] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(parts) + "\n"


def to_json(summary: Mapping[str, Any]) -> str:
    return json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n"


def build_figure(summary: Mapping[str, Any]) -> Any:
    """A matplotlib ``Figure`` (no pyplot, no global backend change). Top: the metric immediately before (hollow)
    and after (filled) every compression step, the quantization's float -> quantized cost, the delivered model's
    metric; pruned fraction on the right axis. Bottom: per-layer bytes, fp32 vs compressed, labelled with storage
    bits and pruned fraction. Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.5), layout="constrained")
    ax_steps, ax_layers = fig.subplots(2, 1)
    name = summary["metric_name"] or "metric"
    events = summary["events"]
    prune = [e for e in events if e["kind"] == "prune"]
    ax_sparsity = ax_steps.twinx()
    if prune:
        steps, levels = [e["step"] for e in prune], [e["sparsity"] or 0.0 for e in prune]
        ax_sparsity.step(steps, levels, where="post", color="tab:orange", alpha=0.6, label="pruned fraction")
        for accepted, colour, label in ((True, "tab:blue", "pruning step kept"), (False, "tab:red", "rolled back")):
            chosen = [e for e in prune if e["accepted"] is accepted and e["metric_after"] is not None]
            for e in chosen:
                if e["metric_before"] is not None:
                    ax_steps.plot([e["step"]] * 2, [e["metric_before"], e["metric_after"]], color=colour, alpha=0.5)
            if chosen:
                ax_steps.plot([e["step"] for e in chosen], [e["metric_before"] for e in chosen], "o", color=colour,
                              fillstyle="none", label=f"{name} before step")
                ax_steps.plot([e["step"] for e in chosen], [e["metric_after"] for e in chosen], "o", color=colour,
                              label=label)
    estimated = [e for e in prune if e["metric_after"] is None and e.get("metric_after_estimate")]
    if estimated:  # drawn apart, with their interval, and labelled: not measured on the whole set
        values = [e["metric_after_estimate"] for e in estimated]
        ax_steps.errorbar([e["step"] for e in estimated], [v["value"] for v in values],
                          yerr=[[v["value"] - v["low"] for v in values], [v["high"] - v["value"] for v in values]],
                          fmt="x", color="tab:purple", label="after, estimated on part of the set (early stop)")
    for e in (e for e in events if e["kind"] == "quantize" and e["metric_after"] is not None):
        colour = "tab:green" if e["accepted"] else "tab:red"
        if e["metric_before"] is not None:
            ax_steps.annotate("", (e["step"], e["metric_after"]), (e["step"], e["metric_before"]),
                              arrowprops={"arrowstyle": "->", "color": colour})
            ax_steps.plot([e["step"]], [e["metric_before"]], "s", color="grey", label=f"{name} float, end of training")
        ax_steps.plot([e["step"]], [e["metric_after"]], "*", markersize=13, color=colour,
                      label="quantized" if e["accepted"] else "quantized, over bound (before fallbacks)")
    if summary["delivered"]["val"] is not None:
        ax_steps.axhline(summary["delivered"]["val"], color="black", linestyle="--", linewidth=1,
                         label=f"delivered model {summary['delivered']['val']:.4f}")
    ax_steps.set_xlabel("optimizer step")
    ax_steps.set_ylabel(name)
    ax_sparsity.set_ylabel("pruned fraction")
    ax_sparsity.set_ylim(0, 1)
    handles, labels = ax_steps.get_legend_handles_labels()
    more_handles, more_labels = ax_sparsity.get_legend_handles_labels()
    unique = dict(zip(labels + more_labels, handles + more_handles))
    if unique:
        ax_steps.legend(list(unique.values()), list(unique), loc="best", fontsize="small", framealpha=0.7)
    ax_steps.set_title("\n".join(headline_parts(summary)), fontsize="small")

    names = list(summary["layers"])
    positions = list(range(len(names)))
    width = 0.4
    before = [summary["layers"][n]["bytes_fp32"] for n in names]
    after = [summary["layers"][n]["bytes_compressed"] for n in names]
    ax_layers.bar([p - width / 2 for p in positions], before, width, color="tab:grey", label="fp32")
    bars = ax_layers.bar([p + width / 2 for p in positions], after, width, color="tab:purple", label="compressed")
    for bar, layer_name in zip(bars, names):
        layer = summary["layers"][layer_name]
        ax_layers.annotate(f"{_fmt_bits(layer['bits'])}\n{layer['sparsity']:.0%} pruned",
                           (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                           fontsize="x-small")
    ax_layers.set_xticks(positions, names, rotation=30, ha="right", fontsize="small")
    ax_layers.set_ylabel("bytes")
    ax_layers.legend(fontsize="small")
    ax_layers.set_title("per layer: bytes before and after (label: storage bits, pruned fraction)", fontsize="medium")
    return fig
