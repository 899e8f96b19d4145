"""The report, out: files in the run's directory, the console, the loggers. Called once per fit, on every rank,
when the last compression callback is done: it summarizes everywhere (cheap, no collective) and prints, writes and
logs on rank zero only. :func:`decide_run_dir` is where every file of a fit goes, so that two fits never overwrite
each other."""

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
from lightning_compress.reporting.svg import build_svg

JSON_NAME = "compression_report.json"
MARKDOWN_NAME = "compression_report.md"
FIGURE_NAME = "compression_report.svg"  # written by every fit
PLOT_NAME = "compression_report.png"  # on request: python -m lightning_compress.reporting.plot RUN_DIR


def write_plot(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Write the matplotlib figure as PNG; ``None`` (with an info line) when matplotlib is not installed. Not part
    of every fit (see :mod:`lightning_compress.reporting.svg`): ``python -m lightning_compress.reporting.plot
    RUN_DIR`` draws it from a written report."""
    try:
        fig = build_figure(summary)
    except ImportError:
        rank_zero_info("lightning-compress: matplotlib is not installed, skipping the report plot "
                       "(`pip install 'lightning-compress[plot]'`)")
        return None
    path = Path(path)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    return path


def write_files(summary: dict[str, Any], directory: str | os.PathLike[str], plot: bool = True) -> dict[str, str]:
    """JSON, Markdown and the figure (SVG, no dependency) into ``directory``; returns what was written, by kind
    (a PNG drawn earlier, on request, is listed as ``report_png``). The JSON lists them all under ``files``.
    ``plot=False``: an update of the text files, the figure already there is kept."""
    directory = Path(directory)
    written = {"report_json": str(directory / JSON_NAME), "report_markdown": str(directory / MARKDOWN_NAME)}
    figure = directory / FIGURE_NAME
    if plot:
        text = build_svg(summary).encode()
        atomic_write(figure, lambda handle: handle.write(text))
    if figure.is_file():
        written["report_plot"] = str(figure)
    if (directory / PLOT_NAME).is_file():
        written["report_png"] = str(directory / PLOT_NAME)
    summary["files"] = {
        **summary["files"],
        **{key: {"path": path, "bytes": os.path.getsize(path) if key in ("report_plot", "report_png") else None}
           for key, path in written.items()},
    }
    write_text(directory / MARKDOWN_NAME, to_markdown(summary, FIGURE_NAME if figure.is_file() else None))
    write_text(directory / JSON_NAME, to_json(summary))
    return written


RUNS_DIR = "lightning_compress_runs"  # under default_root_dir: one fresh run_<n> per fit that has no logger


def decide_run_dir(trainer: pl.Trainer) -> Path:
    """The directory every file of this fit goes to (compressed.ckpt, report, exports with a relative path, the
    compacted model): the logger's log directory when there is one, else a fresh ``default_root_dir /
    lightning_compress_runs / run_<n>`` that no earlier fit used (created with ``exist_ok=False``, so two runs,
    even concurrent ones, never share it). Every rank must call it (rank zero creates, then broadcasts the path);
    the callbacks call it once per fit, in ``setup``, before any training step. A ``default_root_dir`` that cannot
    hold it is refused here, naming it."""
    directory = trainer.log_dir if trainer.loggers else None  # Lightning broadcasts rank zero's (a collective)
    if directory:
        return Path(directory)
    found: str | None = None
    if trainer.is_global_zero:
        try:
            found = str(_fresh_run_dir(Path(trainer.default_root_dir) / RUNS_DIR))
        except OSError as err:
            found = f"`default_root_dir`={str(trainer.default_root_dir)!r}: cannot create this run's directory " \
                    f"{RUNS_DIR}/run_<n> in it ({err.strerror or err}); allowed: a writable directory"
    found = trainer.strategy.broadcast(found)
    if found is None or found.startswith("`default_root_dir`"):
        raise ValueError(found or "no run directory was decided on rank zero")
    return Path(found)


def _fresh_run_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    number = sum(1 for _ in root.glob("run_*"))
    while True:
        candidate = root / f"run_{number}"
        try:
            candidate.mkdir(exist_ok=False)
            return candidate
        except FileExistsError:
            number += 1


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


def save_report(report: CompressionReport, pl_module: pl.LightningModule, directory: str | os.PathLike[str],
                plot: bool = True) -> dict[str, Any]:
    """Summarize (every rank: no collective) and, on rank zero, write the report files into ``directory``; returns
    the summary. A file that cannot be written raises the ``OSError`` naming it (the atomic writer adds the path):
    the caller decides what the fit does about it; a report that cannot be drawn or rendered only warns.
    ``plot=False``: the text files only (an update)."""
    summary = summarize(report, pl_module)
    if getattr(rank_zero_only, "rank", 0) == 0:
        try:
            write_files(summary, directory, plot)
        except OSError:
            raise
        except Exception as err:  # drawing / rendering, not writing: the fit's model is fine, the report says less
            rank_zero_warn(f"lightning-compress: could not render the compression report into {str(directory)!r}: "
                           f"{err!r}")
    for key, file in summary["files"].items():
        report.files.setdefault(key, file["path"])
    return summary


@rank_zero_only
def announce(summary: dict[str, Any], trainer: pl.Trainer) -> None:
    """Print the report and log its figures to every logger (rank zero). The fit is over and its model compressed:
    a logger that cannot take it warns, never raises."""
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


def publish(report: CompressionReport, trainer: pl.Trainer, pl_module: pl.LightningModule,
            directory: str | os.PathLike[str]) -> None:
    """:func:`save_report` into ``directory`` (the run's, from :func:`decide_run_dir`), then :func:`announce`."""
    announce(save_report(report, pl_module, directory), trainer)
