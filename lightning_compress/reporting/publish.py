"""The report, out: files in the run's log directory, the console, the loggers. Called once per fit, on every
rank, when the last compression callback is done: it summarizes everywhere (cheap, no collective) and prints,
writes and logs on rank zero only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_compress.core.io import atomic_write, write_text
from lightning_compress.integration import _compat
from lightning_compress.reporting.records import CompressionReport
from lightning_compress.reporting.render import build_figure, render_console, to_json, to_markdown
from lightning_compress.reporting.summary import summarize

JSON_NAME = "compression_report.json"
MARKDOWN_NAME = "compression_report.md"
PLOT_NAME = "compression_report.png"


def write_plot(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Write the figure as PNG; ``None`` (with an info line) when matplotlib is not installed."""
    try:
        fig = build_figure(summary)
    except ImportError:
        rank_zero_info("lightning-compress: matplotlib is not installed, skipping the report plot "
                       "(`pip install 'lightning-compress[plot]'`)")
        return None
    path = Path(path)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    return path


def write_files(summary: dict[str, Any], directory: str | os.PathLike[str]) -> dict[str, str]:
    """JSON, Markdown and (with matplotlib) PNG into ``directory``; returns what was written, by kind. The JSON
    lists all three under ``files``."""
    directory = Path(directory)
    written = {"report_json": str(directory / JSON_NAME), "report_markdown": str(directory / MARKDOWN_NAME)}
    plot = write_plot(summary, directory / PLOT_NAME)
    if plot is not None:
        written["report_plot"] = str(plot)
    summary["files"] = {
        **summary["files"],
        **{key: {"path": path, "bytes": os.path.getsize(path) if key == "report_plot" else None}
           for key, path in written.items()},
    }
    write_text(directory / MARKDOWN_NAME, to_markdown(summary, PLOT_NAME if plot is not None else None))
    write_text(directory / JSON_NAME, to_json(summary))
    return written


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
    if summary["delivered"]["test"] is not None:
        metrics["compression/test_metric_after"] = float(summary["delivered"]["test"])
    return metrics


def _console(trainer: pl.Trainer) -> Any:
    """The RichProgressBar's console while its live display runs (printing beside it would garble the terminal),
    else a new one; 140 columns when the output is not a terminal (rich would wrap the tables at 80)."""
    from rich.console import Console

    console = _compat.progress_bar_console(trainer)
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
    except Exception as err:
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
        except Exception as err:
            rank_zero_warn(f"lightning-compress: could not log the compression report to {type(logger).__name__}: "
                           f"{err!r}")


def publish(report: CompressionReport, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Summarize (every rank: no collective, so the ranks need not wait for each other) and print, write and log
    (rank zero). Files: ``compression_report.{json,md,png}`` in ``trainer.log_dir`` (else ``default_root_dir``)."""
    summary = summarize(report, pl_module)
    _emit(summary, trainer)
    for key, file in summary["files"].items():
        report.files.setdefault(key, file["path"])
