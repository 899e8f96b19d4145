"""The report's renderings: a rich console view, Markdown, JSON and a matplotlib figure, from a summary
(:func:`lightning_compress.reporting.summary.summarize`). No Lightning import, no file written here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lightning_compress.core.accounting import FLOAT_BITS

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


def headline(summary: Mapping[str, Any]) -> str:
    """One line: metric and size before -> after."""
    name = summary["metric_name"] or "metric"
    return (
        f"{name} {_fmt_metric(summary['metric_before'])} -> {_fmt_metric(summary['metric_after'])}; "
        f"size {_fmt_bytes(summary['bytes_fp32'])} -> {_fmt_bytes(summary['bytes_compressed'])} "
        f"({_fmt_ratio(summary['compression_ratio'])}); sparsity {summary['sparsity']:.1%}"
    )


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
EVENT_COLUMNS = ["#", "kind", "step", "metric before", "metric after", "drop", "sparsity", "accepted", "note"]


def _event_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    return [
        [
            str(i), e["kind"], str(e["step"]), _fmt_metric(e["metric_before"]), _fmt_metric(e["metric_after"]),
            "-" if e["metric_drop"] is None else f"{e['metric_drop']:+.4f}",
            "-" if e["sparsity"] is None else f"{e['sparsity']:.1%}",
            "yes" if e["accepted"] else "rolled back", e["note"],
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
    for key, path in summary["files"].items():
        parts.append(Text(f"{key}: {path}", style="dim"))
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
    parts += [
        (
            f"- metric ({summary['metric_name'] or '-'}): {_fmt_metric(summary['metric_before'])} before, "
            f"{_fmt_metric(summary['metric_after'])} after"
        ),
        f"- bytes (fp32): {summary['bytes_fp32']:,}",
        f"- bytes (compressed): {summary['bytes_compressed']:,}",
        f"- compression ratio: {_fmt_ratio(summary['compression_ratio'])}",
        f"- sparsity of the compressed layers: {summary['sparsity']:.2%}",
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
        parts += ["", "## Files", ""] + [f"- {key}: `{path}`" for key, path in summary["files"].items()]
    if plot_name:
        parts += ["", f"![compression report]({plot_name})"]
    parts += ["", "## Notes", ""] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(parts) + "\n"


def to_json(summary: Mapping[str, Any]) -> str:
    return json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n"


def build_figure(summary: Mapping[str, Any]) -> Any:
    """A matplotlib ``Figure`` (no pyplot, no global backend change): metric and sparsity over the compression
    steps, and per-layer sparsity and bits. Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    ax_steps, ax_layers = fig.subplots(2, 1)
    name = summary["metric_name"] or "metric"

    prune = [e for e in summary["events"] if e["kind"] == "prune"]
    other = [e for e in summary["events"] if e["kind"] != "prune"]
    ax_sparsity = ax_steps.twinx()
    if prune:
        steps = [e["step"] for e in prune]
        levels = [e["sparsity"] or 0.0 for e in prune]
        last = max(e["step"] for e in summary["events"])
        if last > steps[-1]:  # hold the last level until the end (e.g. the quantization at the end of fit)
            steps, levels = steps + [last], levels + [levels[-1]]
        ax_sparsity.step(steps, levels, where="post", color="tab:orange", alpha=0.7, label="sparsity (after step)")
        kept = [e for e in prune if e["accepted"] and e["metric_after"] is not None]
        rolled = [e for e in prune if not e["accepted"] and e["metric_after"] is not None]
        if kept:
            ax_steps.plot([e["step"] for e in kept], [e["metric_after"] for e in kept], "o-", color="tab:blue",
                          label=f"{name} after pruning step")
        if rolled:
            ax_steps.plot([e["step"] for e in rolled], [e["metric_after"] for e in rolled], "x", color="tab:red",
                          markersize=9, label="rolled back")
    for event in other:
        if event["metric_after"] is not None:
            ax_steps.plot([event["step"]], [event["metric_after"]], "*", markersize=13,
                          color="tab:green" if event["accepted"] else "tab:red",
                          label=f"{event['kind']}{'' if event['accepted'] else ' (over bound)'}")
    if summary["metric_before"] is not None:
        ax_steps.axhline(summary["metric_before"], color="grey", linestyle="--", linewidth=1, label=f"{name} before")
    ax_steps.set_xlabel("optimizer step")
    ax_steps.set_ylabel(name)
    ax_sparsity.set_ylabel("sparsity")
    ax_sparsity.set_ylim(0, 1)
    handles, labels = ax_steps.get_legend_handles_labels()
    more_handles, more_labels = ax_sparsity.get_legend_handles_labels()
    if handles or more_handles:
        ax_steps.legend(handles + more_handles, labels + more_labels, loc="best", fontsize="small", framealpha=0.7)
    ax_steps.set_title(f"{headline(summary)}", fontsize="medium")

    names = list(summary["layers"])
    positions = list(range(len(names)))
    sparsities = [summary["layers"][n]["sparsity"] for n in names]
    bars = ax_layers.bar(positions, sparsities, color="tab:orange", alpha=0.8, label="sparsity")
    for bar, layer_name in zip(bars, names):
        ax_layers.annotate(_fmt_bits(summary["layers"][layer_name]["bits"]),
                           (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                           ha="center", va="bottom", fontsize="small")
    ax_layers.set_xticks(positions, names, rotation=30, ha="right", fontsize="small")
    ax_layers.set_ylim(0, 1.1)
    ax_layers.set_ylabel("sparsity (label: storage bits)")
    ax_layers.set_title("per layer", fontsize="medium")
    return fig


