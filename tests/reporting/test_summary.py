"""The report's summary: totals over the whole model, what counts as savings, JSON-safe values."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_compress.core.accounting import state_bytes
from lightning_compress.reporting import summary as summary_module
from lightning_compress.reporting.records import CompressionEvent, CompressionReport, LayerRecord
from lightning_compress.reporting.render import to_json, to_markdown
from lightning_compress.reporting.summary import summarize
from tests.reporting._fixtures import BN_FP32, CONV_FP32, LINEAR_FP32, _model, _report
from tests.reporting.test_render import _render


def test_totals_cover_the_whole_model() -> None:
    model = _model()
    summary = summarize(_report(model), model)
    assert summary["bytes_fp32"] == CONV_FP32 + BN_FP32 + LINEAR_FP32
    # conv stored dense (no saving from its 50 % zeros), BN untouched, linear 272 -> 64
    assert summary["bytes_compressed"] == CONV_FP32 + BN_FP32 + 64
    assert summary["compression_ratio"] == pytest.approx(summary["bytes_fp32"] / summary["bytes_compressed"])
    assert summary["other_state"] == {"entries": 5, "bytes_fp32": BN_FP32, "bytes_compressed": BN_FP32}
    assert summary["layers_bytes_fp32"] == CONV_FP32 + LINEAR_FP32
    assert summary["sparsity"] == pytest.approx((0.5 * 144 + 0.25 * 64) / (144 + 64))
    assert summary["metric_drop"] == pytest.approx(0.01)
    assert summary["layers"]["0"]["note"] == "pruned, stored dense"
    assert summary_module.NOTE_DENSE in summary["notes"] and summary_module.NOTE_WHOLE_MODEL in summary["notes"]
    assert summary_module.NOTE_NO_EXPORT in summary["notes"]  # int4 layer, but no export file recorded


def test_pruned_weights_are_never_counted_as_savings() -> None:
    """A float layer costs what the model holds, even if its record claims less (no sparse format is exported)."""
    model = _model()
    report = _report(model)
    report.layers["0"].bytes_compressed = 100
    summary = summarize(report, model)
    assert summary["layers"]["0"]["bytes_compressed"] == CONV_FP32  # 50 % sparse, float: no saving
    assert summarize(report)["layers"]["0"]["bytes_compressed"] == CONV_FP32  # without the model: its fp32 size


def test_compaction_is_counted_from_the_smaller_model() -> None:
    model = _model()
    report = _report(model)  # snapshot of the full-size model
    with torch.no_grad():  # "compact" the conv to 8 channels (and its BatchNorm), as compaction would
        model[0] = nn.Conv2d(1, 8, 3)
        model[1] = nn.BatchNorm2d(8)
    summary = summarize(report, model)
    assert summary["layers"]["0"]["bytes_compressed"] == 4 * (72 + 8)
    assert "compacted" in summary["layers"]["0"]["note"]
    assert summary["layers"]["0"]["bytes_fp32"] == CONV_FP32  # "before" is the snapshot
    assert summary["other_state"]["bytes_compressed"] == 4 * 8 * 4 + 8
    assert summary["bytes_fp32"] == CONV_FP32 + BN_FP32 + LINEAR_FP32


def test_quantized_layer_counts_its_other_entries_as_the_model_holds_them() -> None:
    """MultiheadAttention: the record covers `in_proj_weight` only (no `bias` attribute); `in_proj_bias` is still
    stored (float) and must be counted, out_proj is another module (other state)."""
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    report = CompressionReport(model_state_bytes=state_bytes(model))
    report.layers["0"] = LayerRecord(parameters=192, bits=8, bytes_fp32=4 * 192, bytes_compressed=192 + 4 * 24)
    summary = summarize(report, model)
    assert summary["layers"]["0"]["bytes_fp32"] == 4 * (192 + 24)
    assert summary["layers"]["0"]["bytes_compressed"] == 192 + 4 * 24 + 4 * 24
    assert summary["other_state"]["bytes_compressed"] == 4 * (64 + 8)


def test_without_model_or_snapshot_the_records_alone_are_used() -> None:
    summary = summarize(_report())
    assert summary["bytes_fp32"] == CONV_FP32 + LINEAR_FP32
    assert summary["bytes_compressed"] == CONV_FP32 + 64
    assert summary["other_state"]["entries"] == 0


def test_empty_report_and_nan_metrics_are_json_safe() -> None:
    report = CompressionReport(metric_before=float("nan"))
    report.events.append(CompressionEvent("prune", 1, float("nan"), None))
    summary = summarize(report)
    assert summary["sparsity"] == 0.0 and summary["compression_ratio"] is None and summary["metric_before"] is None
    json.loads(to_json(summary))
    to_markdown(summary)
    _render(summary)


def test_headline_compares_like_with_like() -> None:
    """The quantization's cost is float-at-the-end vs quantized; pruning's is its worst kept step; the metric before
    the first pruning event is labelled, never shown as the uncompressed reference."""
    report = _report()
    report.events[0].reference, report.events[0].drop = 0.95, -0.005
    report.events[2].reference, report.events[2].drop = 0.955, 0.005
    summary = summarize(report)
    assert summary["quantization"] == {"metric_float": 0.95, "metric_quantized": 0.94,
                                       "metric_drop": pytest.approx(0.01), "fallbacks": 1}
    assert summary["pruning"]["events"] == 3 and summary["pruning"]["rolled_back"] == 1
    assert summary["pruning"]["largest_accepted_drop"] == pytest.approx(0.005)
    assert summary["pruning"]["metric_before_first_event"] == 0.95
    assert summary["delivered"] == {"val": 0.94, "test": None}


def test_bytes_are_the_export_files_when_one_exists(tmp_path) -> None:
    model = _model()
    report = _report(model)
    export = tmp_path / "model.safetensors"
    export.write_bytes(b"x" * 1234)
    report.files["quantized"] = str(export)
    summary = summarize(report, model)
    assert summary["bytes_compressed"] == 1234 and summary["bytes_source"] == "file"
    assert summary["bytes_compressed_estimate"] == CONV_FP32 + BN_FP32 + 64
    assert summary["files"]["quantized"] == {"path": str(export), "bytes": 1234}
    assert summary_module.NOTE_FILE_SIZE in summary["notes"]


def test_rounding_zeros_are_not_sparsity() -> None:
    report = CompressionReport()
    report.layers["fc"] = LayerRecord(parameters=100, sparsity=0.0, bits=4, bytes_fp32=400, bytes_compressed=60,
                                      zeros_after_rounding=0.1)
    summary = summarize(report)
    assert summary["sparsity"] == 0.0 and summary["zeros_after_rounding"] == pytest.approx(0.1)


def test_schema_versions_and_settings_are_in_the_json() -> None:
    report = _report()
    report.settings["quantization"] = {"bits": 4}
    data = json.loads(to_json(summarize(report)))
    assert data["schema_version"] == 2 and data["settings"]["quantization"]["bits"] == 4
    assert set(data["versions"]) == {"lightning_compress", "torch", "lightning", "torchmetrics"}


def test_the_dense_note_is_given_only_for_pruned_float_layers() -> None:
    """A pruned layer that is quantized may be stored sparse by the export (its record's bytes say what it takes):
    the note that pruned weights are stored dense would be false for it."""
    model = _model()
    report = _report(model)
    report.layers["0"].sparsity = 0.0  # the pruned float conv is no longer pruned: only the int4 linear is
    summary = summarize(report, model)
    assert report.layers["3"].sparsity > 0 and report.layers["3"].bits < 32
    assert summary_module.NOTE_DENSE not in summary["notes"]
    assert "stored dense" not in summary["layers"]["3"]["note"]
