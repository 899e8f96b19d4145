"""The report's renderings and files: console, JSON, Markdown, the SVG figure, the PNG on request."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from rich.console import Console

from lightning_compress.reporting import publish as publish_module
from lightning_compress.reporting import render as report_output
from lightning_compress.reporting.plot import main as plot_main
from lightning_compress.reporting.publish import write_files
from lightning_compress.reporting.summary import summarize
from lightning_compress.reporting.svg import build_svg
from tests.reporting._fixtures import BN_FP32, CONV_FP32, LINEAR_FP32, PNG_MAGIC, _model, _report


def _render(summary: dict) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None).print(report_output.render_console(summary))
    return buffer.getvalue()


def test_console_rendering_shows_layers_totals_steps_and_fallbacks() -> None:
    model = _model()
    text = _render(summarize(_report(model), model))
    for expected in ("delivered MulticlassAccuracy 0.9400 val", "quantization: float 0.9500 -> quantized 0.9400",
                     "pruning: 3 steps, 1 rolled back", "int4", "fp32", "total", "whole model", "rolled back",
                     "quantize", "Quantization fallbacks", "sensitivity", "stored dense", "estimate"):
        assert expected in text, expected


def test_files_json_markdown_plot(tmp_path: Path) -> None:
    model = _model()
    summary = summarize(_report(model), model)
    written = write_files(summary, tmp_path / "logs")
    data = json.loads((tmp_path / "logs" / publish_module.JSON_NAME).read_text())
    for key in ("metric_before", "metric_after", "sparsity", "bytes_fp32", "bytes_compressed", "layers", "events",
                "fallbacks", "notes", "files"):
        assert key in data, key
    assert data["bytes_fp32"] == CONV_FP32 + BN_FP32 + LINEAR_FP32
    assert data["layers"]["3"]["bits"] == 4 and len(data["events"]) == 4 and data["fallbacks"][0]["layer"] == "0"
    assert set(written) == {"report_json", "report_markdown", "report_plot"}
    assert {k: v["path"] for k, v in data["files"].items()} == written

    markdown = (tmp_path / "logs" / publish_module.MARKDOWN_NAME).read_text()
    assert "| layer | weights | sparsity | bits |" in markdown and "## Quantization fallbacks" in markdown
    assert f"![compression report]({publish_module.FIGURE_NAME})" in markdown
    svg = (tmp_path / "logs" / publish_module.FIGURE_NAME).read_text()
    ElementTree.fromstring(svg)  # well-formed
    for expected in ("delivered MulticlassAccuracy 0.9400 val", "int4", "pruned fraction", "per layer"):
        assert expected in svg, expected
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted(
        [publish_module.JSON_NAME, publish_module.MARKDOWN_NAME, publish_module.FIGURE_NAME]
    )  # no temporary file left behind, no PNG unless asked for


def test_the_figure_needs_no_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import matplotlib.figure` raises ImportError
    written = write_files(summarize(_report()), tmp_path)
    assert (tmp_path / publish_module.FIGURE_NAME).is_file() and written["report_plot"].endswith(".svg")


def test_the_png_is_drawn_on_request_from_the_written_report(tmp_path: Path) -> None:
    model = _model()
    write_files(summarize(_report(model), model), tmp_path)
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / publish_module.PLOT_NAME).read_bytes()[:8] == PNG_MAGIC
    written = write_files(summarize(_report(model), model), tmp_path, plot=False)  # a later update lists it
    assert written["report_png"] == str(tmp_path / publish_module.PLOT_NAME)


def test_the_png_on_request_refuses_a_directory_without_a_report(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        plot_main([str(tmp_path)])
    assert f"`run_dir`={str(tmp_path)!r} holds no compression_report.json" in capsys.readouterr().err


def test_plot_is_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    write_files(summarize(_report(model), model), tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import matplotlib.figure` raises ImportError
    assert plot_main([str(tmp_path)]) == 1 and not (tmp_path / publish_module.PLOT_NAME).exists()


def test_a_report_without_figure_does_not_link_one(tmp_path: Path) -> None:
    write_files(summarize(_report()), tmp_path, plot=False)
    assert "![compression report]" not in (tmp_path / publish_module.MARKDOWN_NAME).read_text()


def test_an_early_stopped_event_is_shown_and_summarised_as_an_estimate_not_as_the_metric() -> None:
    model = _model()
    report = _report(model)
    event = report.events[0]
    event.estimated({"value": 0.912345, "low": 0.9, "high": 0.93, "samples": 256, "population": 270})
    summary = summarize(report, model)
    first = summary["events"][0]
    assert first["metric_after"] is None and first["metric_drop"] is None
    assert first["metric_after_estimate"]["samples"] == 256
    assert "metric after estimated on 256 of 270 samples: 0.9123 [0.9000, 0.9300]" in first["note"]
    markdown = report_output.to_markdown(summary)
    assert "~0.9123 (estimated on 256 of 270 samples)" in markdown
    figure = report_output.build_figure(summary)  # drawn apart with its interval, labelled as an estimate
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "after, estimated on part of the set (early stop)" in labels
    svg = build_svg(summary)
    ElementTree.fromstring(svg)  # well-formed
    assert "after, estimated on part of the set (early stop)" in svg


def test_the_console_line_marks_an_estimated_metric_after() -> None:
    entry = {"step": 30, "metric_before": 0.9, "metric_after": 0.88, "accepted": True}
    measured = report_output.pruning_line(entry, "accuracy", 0.5, False)
    estimated = report_output.pruning_line(entry, "accuracy", 0.5, False,
                                           estimate={"samples": 256, "population": 750})
    assert "-> 0.8800" in measured and "estimated" not in measured
    assert "-> ~0.8800 (estimated on 256 of 750 samples)" in estimated
