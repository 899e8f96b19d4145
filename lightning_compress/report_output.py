"""The compression report, out: totals, a rich table on the console, JSON / Markdown / PNG files, logger metrics.

:func:`publish` is called once per fit, on every rank, when the last compression callback is done. It computes the
summary everywhere (cheap, no collective) and prints / writes / logs on rank zero only.

Byte accounting (what ``bytes_fp32`` / ``bytes_compressed`` mean):

- The totals cover the **whole model state** (every parameter and buffer of ``state_dict``, e.g. BatchNorm
  statistics), not only the compressed layers, so the ratio is the one of the model file. Floating-point
  entries are counted at 4 bytes per element; an entry no callback compressed costs the same before and after.
- "Before" is the model as it was when the first compression callback registered (in ``setup``), i.e. before
  pruning or compaction changed any shape.
- A compressed layer costs what the project's exports actually store: quantized layers the packed integer codes,
  scales and zero points plus the float bias (the quantized safetensors format); layers kept in float their fp32
  size. **Pruned weights are stored dense** (the zeros take space), so sparsity alone saves no byte; structured
  compaction (a physically smaller layer) or quantization realize the savings, and only those are counted.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn

from lightning_compress.report import CompressionReport, state_bytes

JSON_NAME = "compression_report.json"
MARKDOWN_NAME = "compression_report.md"
PLOT_NAME = "compression_report.png"
FLOAT_BITS = 32

NOTE_WHOLE_MODEL = (
    "Totals cover the whole model state (all parameters and buffers, e.g. BatchNorm statistics), floats counted at "
    "4 bytes; entries no callback compressed cost the same before and after."
)
NOTE_DENSE = (
    "Pruned weights are stored dense (their zeros take space, in float as in the quantized format): sparsity alone "
    "is not counted as savings; structured compaction or quantization realize the savings."
)
NOTE_NO_EXPORT = (
    "Quantized sizes are those of the quantized safetensors export (packed codes + scales + float bias); this run "
    "wrote no export file (set `export_path` of PostTrainingQuantization to write one)."
)


# ---------------------------------------------------------------------------------------------------- summary
def _owner(key: str) -> str:
    """``"net.1.weight"`` -> ``"net.1"``: the module a state_dict entry belongs to."""
    return key.rpartition(".")[0]


def _by_owner(sizes: Mapping[str, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, size in sizes.items():
        out.setdefault(_owner(key), {})[key] = size
    return out


def _finite(value: Any) -> Any:
    """NaN / inf -> None (JSON has no such numbers); everything else unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _drop(before: float | None, after: float | None, higher_is_better: bool) -> float | None:
    if before is None or after is None:
        return None
    return before - after if higher_is_better else after - before


def summarize(report: CompressionReport, model: nn.Module | None = None) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-able values.

    ``model`` is the model after compression (its current state_dict gives the size of entries no layer record
    covers, and of layers that structured compaction made smaller); without it the records alone are used.
    """
    before_state = dict(report.model_state_bytes)
    current_state = state_bytes(model) if model is not None else {}
    before_by_owner, current_by_owner = _by_owner(before_state), _by_owner(current_state)
    layer_names = set(report.layers)

    layers: dict[str, dict[str, Any]] = {}
    any_dense_pruned = False
    for name, record in report.layers.items():
        bytes_fp32 = sum(before_by_owner.get(name, {}).values()) or record.bytes_fp32
        current = current_by_owner.get(name, {})
        notes = [record.note] if record.note else []
        if record.bits < FLOAT_BITS:
            # quantized: its weight as the quantized export stores it (codes + scales + zero points; the record's
            # bytes_compressed minus its float bias), plus the layer's other entries (bias, ...) as the model holds them
            record_bias = max(0, record.bytes_fp32 - 4 * record.parameters)
            weight_key = next((k for k in (f"{name}.weight", f"{name}.in_proj_weight") if k in current), None)
            others = sum(b for k, b in current.items() if k != weight_key) if weight_key else record_bias
            bytes_compressed = (record.bytes_compressed or record.bytes_fp32) - record_bias + others
        else:  # float: what the model holds now, whatever the record says (no sparse format is exported)
            bytes_compressed = sum(current.values()) or record.bytes_fp32
            if bytes_compressed < bytes_fp32:
                notes.append("compacted")  # compaction removed rows / columns: the model itself is smaller
        if record.sparsity > 0 and "compacted" not in notes:
            any_dense_pruned = True
            if record.bits >= FLOAT_BITS:
                notes.append("pruned, stored dense")
        layers[name] = {
            "parameters": record.parameters,
            "sparsity": record.sparsity,
            "bits": record.bits,
            "bytes_fp32": bytes_fp32,
            "bytes_compressed": bytes_compressed,
            "ratio": bytes_fp32 / bytes_compressed if bytes_compressed else None,
            "note": "; ".join(notes),
        }

    other_before_map = {k: b for k, b in (before_state or current_state).items() if _owner(k) not in layer_names}
    other_after_map = {k: b for k, b in (current_state or before_state).items() if _owner(k) not in layer_names}
    other_before, other_after = sum(other_before_map.values()), sum(other_after_map.values())
    layers_fp32 = sum(v["bytes_fp32"] for v in layers.values())
    layers_compressed = sum(v["bytes_compressed"] for v in layers.values())
    bytes_fp32 = layers_fp32 + other_before
    bytes_compressed = layers_compressed + other_after
    weights = sum(v["parameters"] for v in layers.values())
    sparsity = sum(v["sparsity"] * v["parameters"] for v in layers.values()) / weights if weights else 0.0

    events = []
    for event in report.events:
        events.append({
            "kind": event.kind,
            "step": event.step,
            "metric_before": _finite(event.metric_before),
            "metric_after": _finite(event.metric_after),
            "metric_drop": _finite(_drop(event.metric_before, event.metric_after, report.higher_is_better)),
            "sparsity": _finite(event.sparsity),
            "accepted": event.accepted,
            "note": event.note,
        })

    quantized = any(v["bits"] < FLOAT_BITS for v in layers.values())
    notes = [NOTE_WHOLE_MODEL]
    if any_dense_pruned and any(e["kind"] == "prune" for e in events):
        notes.append(NOTE_DENSE)
    if quantized and "quantized" not in report.files:
        notes.append(NOTE_NO_EXPORT)

    return {
        "metric_name": report.metric_name,
        "higher_is_better": report.higher_is_better,
        "metric_before": _finite(report.metric_before),
        "metric_after": _finite(report.metric_after),
        "metric_drop": _finite(_drop(report.metric_before, report.metric_after, report.higher_is_better)),
        "sparsity": sparsity,
        "bytes_fp32": bytes_fp32,
        "bytes_compressed": bytes_compressed,
        "compression_ratio": bytes_fp32 / bytes_compressed if bytes_compressed else None,
        "layers_bytes_fp32": layers_fp32,
        "layers_bytes_compressed": layers_compressed,
        "other_state": {"entries": len(other_after_map), "bytes_fp32": other_before, "bytes_compressed": other_after},
        "layers": layers,
        "events": events,
        "fallbacks": [{k: _finite(v) for k, v in f.items()} for f in report.fallbacks],
        "files": dict(report.files),
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------------- formatting
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


# ---------------------------------------------------------------------------------------------------- files
def _atomic_write(path: Path, write: Any) -> None:
    """``write(file_object)`` into a temporary file beside ``path``, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    path = Path(path)
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    return path


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


def write_plot(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Write the figure as PNG; ``None`` (with an info line) when matplotlib is not installed."""
    try:
        fig = build_figure(summary)
    except ImportError:
        rank_zero_info("lightning-compress: matplotlib is not installed, skipping the report plot "
                       "(`pip install 'lightning-compress[plot]'`)")
        return None
    path = Path(path)
    _atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    return path


def write_files(summary: dict[str, Any], directory: str | os.PathLike[str]) -> dict[str, str]:
    """JSON, Markdown and (with matplotlib) PNG into ``directory``; returns what was written, by kind. The JSON
    lists all three under ``files``."""
    directory = Path(directory)
    written = {"report_json": str(directory / JSON_NAME), "report_markdown": str(directory / MARKDOWN_NAME)}
    plot = write_plot(summary, directory / PLOT_NAME)
    if plot is not None:
        written["report_plot"] = str(plot)
    summary["files"] = {**summary["files"], **written}
    write_text(directory / MARKDOWN_NAME, to_markdown(summary, PLOT_NAME if plot is not None else None))
    write_text(directory / JSON_NAME, to_json(summary))
    return written


# ---------------------------------------------------------------------------------------------------- publish
def output_dir(trainer: pl.Trainer) -> str:
    """``trainer.log_dir`` without its broadcast (only rank zero writes), falling back to ``default_root_dir``."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = getattr(logger, "log_dir", None) or logger.save_dir
        if directory:
            return str(directory)
    return str(trainer.default_root_dir)


def logger_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {
        "compression/bytes_fp32": float(summary["bytes_fp32"]),
        "compression/bytes_compressed": float(summary["bytes_compressed"]),
        "compression/sparsity": float(summary["sparsity"]),
    }
    if summary["compression_ratio"] is not None:
        metrics["compression/ratio"] = float(summary["compression_ratio"])
    for key in ("metric_before", "metric_after"):
        if summary[key] is not None:
            metrics[f"compression/{key}"] = float(summary[key])
    return metrics


def _console(trainer: pl.Trainer) -> Any:
    """The RichProgressBar's console while its live display runs (printing beside it would garble the terminal),
    else a new one; 140 columns when the output is not a terminal (rich would wrap the tables at 80)."""
    from rich.console import Console

    console = getattr(trainer.progress_bar_callback, "_console", None)  # RichProgressBar only
    if not isinstance(console, Console):
        console = Console()
    if not console.is_terminal:
        console = Console(width=140, file=console.file)
    return console


@rank_zero_only
def _emit(summary: dict[str, Any], trainer: pl.Trainer) -> None:
    # The fit is over and its model is compressed: a report that cannot be written or drawn warns, never raises.
    directory = output_dir(trainer)
    try:
        write_files(summary, directory)
    except Exception as err:  # noqa: BLE001
        rank_zero_warn(f"lightning-compress: could not write the compression report to {directory!r}: {err!r}")
    _console(trainer).print(render_console(summary))
    metrics = logger_metrics(summary)
    for logger in trainer.loggers:
        try:
            logger.log_metrics(metrics, step=trainer.global_step)
            add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)  # TensorBoard
            if callable(add_figure):
                add_figure("compression/report", build_figure(summary), global_step=trainer.global_step)
        except ImportError:  # no matplotlib: the figure is skipped (write_files said so)
            pass
        except Exception as err:  # noqa: BLE001
            rank_zero_warn(f"lightning-compress: could not log the compression report to {type(logger).__name__}: "
                           f"{err!r}")


def publish(report: CompressionReport, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Summarize (every rank: no collective, so the ranks need not wait for each other) and print, write and log
    (rank zero). Files: ``compression_report.{json,md,png}`` in ``trainer.log_dir`` (else ``default_root_dir``)."""
    summary = summarize(report, pl_module)
    _emit(summary, trainer)
    for key, path in summary["files"].items():
        report.files.setdefault(key, path)
