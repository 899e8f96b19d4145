"""Publishing the report at the end of a fit: files in the log directory, console, loggers, rank zero only."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_compress.reporting import publish as report_output
from lightning_compress.reporting.publish import publish
from tests.reporting._fixtures import _model, _report


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


def test_a_report_that_cannot_be_written_warns_and_never_fails_the_fit(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    trainer = pl.Trainer(logger=False, default_root_dir=blocker, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="could not write the compression report"):
        publish(_report(), trainer, _model())
