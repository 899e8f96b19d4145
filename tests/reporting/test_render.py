"""The compression report: totals, console rendering, JSON / Markdown / PNG files, logger metrics, rank zero only.

Built on a hand-made ``CompressionReport`` and a tiny model with BatchNorm, so every number is checked by hand.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from torch import nn

from lightning_compress.reporting import render as report_output
from lightning_compress.reporting.records import (
    CompressionEvent,
    CompressionReport,
    LayerRecord,
    register,
    report_for,
    state_bytes,
)
from lightning_compress.reporting.render import publish, summarize, to_markdown, write_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model() -> nn.Sequential:
    # conv 16*1*3*3 + 16 bias, BN(16) weight/bias/running_mean/running_var + num_batches_tracked, Linear 16 -> 4
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16, 4))


CONV_FP32 = 4 * (144 + 16)  # 640
BN_FP32 = 4 * 16 * 4 + 8  # four float vectors + the int64 counter
LINEAR_FP32 = 4 * (64 + 4)  # 272


def _report(model: nn.Module | None = None) -> CompressionReport:
    report = CompressionReport(metric_name="MulticlassAccuracy", metric_before=0.95, metric_after=0.94)
    # conv: pruned to 50 %, kept float (stored dense); linear: int4, 32 bytes of codes + 16 of scales + 16 of bias
    report.layers["0"] = LayerRecord(parameters=144, sparsity=0.5, bits=32, bytes_fp32=CONV_FP32,
                                     bytes_compressed=CONV_FP32)
    report.layers["3"] = LayerRecord(parameters=64, sparsity=0.25, bits=4, bytes_fp32=LINEAR_FP32, bytes_compressed=64,
                                     note="int4 SQNR 20.0 dB")
    report.events = [
        CompressionEvent("prune", 10, 0.95, 0.955, 0.25),
        CompressionEvent("prune", 20, 0.955, 0.90, 0.5, accepted=False, note="rolled back"),
        CompressionEvent("prune", 30, 0.955, 0.95, 0.45),
        CompressionEvent("quantize", 40, 0.95, 0.94, None, note="final"),
    ]
    report.fallbacks = [{"layer": "0", "from_bits": 4, "to_bits": 32, "kept": "float", "sensitivity": 0.02}]
    if model is not None:
        report.model_state_bytes = state_bytes(model)
    return report


# --------------------------------------------------------------------------- accounting
def test_state_bytes_counts_floats_as_fp32_and_tied_tensors_once() -> None:
    model = _model()
    sizes = state_bytes(model)
    assert sizes["0.weight"] == 4 * 144 and sizes["1.num_batches_tracked"] == 8
    assert sum(sizes.values()) == CONV_FP32 + BN_FP32 + LINEAR_FP32
    assert state_bytes(model.to(torch.bfloat16))["0.weight"] == 4 * 144  # counted as fp32 whatever the dtype

    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert state_bytes(tied) == {"0.weight": 160}


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
    assert report_output.NOTE_DENSE in summary["notes"] and report_output.NOTE_WHOLE_MODEL in summary["notes"]
    assert report_output.NOTE_NO_EXPORT in summary["notes"]  # int4 layer, but no export file recorded


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
    json.loads(report_output.to_json(summary))
    to_markdown(summary)
    _render(summary)


# --------------------------------------------------------------------------- rendering and files
def _render(summary: dict) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None).print(report_output.render_console(summary))
    return buffer.getvalue()


def test_console_rendering_shows_layers_totals_steps_and_fallbacks() -> None:
    model = _model()
    text = _render(summarize(_report(model), model))
    for expected in ("MulticlassAccuracy 0.9500 -> 0.9400", "int4", "fp32", "total", "whole model",
                     "rolled back", "quantize", "Quantization fallbacks", "sensitivity", "stored dense"):
        assert expected in text, expected


def test_files_json_markdown_plot(tmp_path: Path) -> None:
    model = _model()
    summary = summarize(_report(model), model)
    written = write_files(summary, tmp_path / "logs")
    data = json.loads((tmp_path / "logs" / report_output.JSON_NAME).read_text())
    for key in ("metric_before", "metric_after", "sparsity", "bytes_fp32", "bytes_compressed", "layers", "events",
                "fallbacks", "notes", "files"):
        assert key in data, key
    assert data["bytes_fp32"] == CONV_FP32 + BN_FP32 + LINEAR_FP32
    assert data["layers"]["3"]["bits"] == 4 and len(data["events"]) == 4 and data["fallbacks"][0]["layer"] == "0"
    assert set(written) == {"report_json", "report_markdown", "report_plot"} and data["files"] == written

    markdown = (tmp_path / "logs" / report_output.MARKDOWN_NAME).read_text()
    assert "| layer | weights | sparsity | bits |" in markdown and "## Quantization fallbacks" in markdown
    assert f"![compression report]({report_output.PLOT_NAME})" in markdown
    assert (tmp_path / "logs" / report_output.PLOT_NAME).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted(
        [report_output.JSON_NAME, report_output.MARKDOWN_NAME, report_output.PLOT_NAME]
    )  # no temporary file left behind


def test_plot_is_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import matplotlib.figure` raises ImportError
    summary = summarize(_report())
    written = write_files(summary, tmp_path)
    assert "report_plot" not in written and not (tmp_path / report_output.PLOT_NAME).exists()
    assert "![compression report]" not in (tmp_path / report_output.MARKDOWN_NAME).read_text()


def test_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    def explode(handle) -> None:
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        report_output._atomic_write(target, explode)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


# --------------------------------------------------------------------------- publish
def _trainer(tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(logger=CSVLogger(tmp_path), default_root_dir=tmp_path, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)


def test_publish_writes_prints_and_logs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _model()
    trainer = _trainer(tmp_path)
    report = _report(model)
    publish(report, trainer, model)
    log_dir = Path(trainer.loggers[0].log_dir)
    assert (log_dir / report_output.JSON_NAME).is_file() and (log_dir / report_output.MARKDOWN_NAME).is_file()
    assert report.files["report_json"] == str(log_dir / report_output.JSON_NAME)
    assert "lightning-compress report" in capsys.readouterr().out
    trainer.loggers[0].save()
    header = (log_dir / "metrics.csv").read_text().splitlines()[0]
    for key in ("compression/bytes_fp32", "compression/bytes_compressed", "compression/ratio", "compression/sparsity"):
        assert key in header, key


def test_publish_without_logger_writes_to_default_root_dir(tmp_path: Path) -> None:
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    publish(_report(), trainer, _model())
    assert (tmp_path / report_output.JSON_NAME).is_file()


def test_publish_on_other_ranks_writes_and_prints_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(report_output.rank_zero_only, "rank", 1)
    publish(_report(), trainer, _model())
    assert not list(tmp_path.rglob(report_output.JSON_NAME))
    assert "lightning-compress report" not in capsys.readouterr().out


def test_register_snapshots_the_model_before_compression(tmp_path: Path) -> None:
    class Snapshot(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            register(trainer, "snapshot")

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 3, 3)), batch_size=2)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[Snapshot()])
    trainer.fit(Tiny(), data)
    snapshot = report_for(trainer).model_state_bytes
    assert sum(snapshot.values()) == CONV_FP32 + BN_FP32 + LINEAR_FP32 and "net.0.weight" in snapshot
    assert "model_state_bytes" not in report_for(trainer).to_dict()


def test_a_report_that_cannot_be_written_warns_and_never_fails_the_fit(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    trainer = pl.Trainer(logger=False, default_root_dir=blocker, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="could not write the compression report"):
        publish(_report(), trainer, _model())
