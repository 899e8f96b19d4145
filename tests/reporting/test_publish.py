"""Publishing the report at the end of a fit: files in the log directory, console, loggers, rank zero only."""

from __future__ import annotations

import errno
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_compress.core import io
from lightning_compress.reporting import publish as report_output
from lightning_compress.reporting.publish import publish, save_report
from tests.reporting._fixtures import _model, _report


def _trainer(tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(logger=CSVLogger(tmp_path), default_root_dir=tmp_path, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)


def test_publish_writes_prints_and_logs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _model()
    trainer = _trainer(tmp_path)
    report = _report(model)
    directory = report_output.decide_run_dir(trainer)
    assert directory == Path(trainer.loggers[0].log_dir)  # a logger: its log directory
    publish(report, trainer, model, directory)
    assert (directory / report_output.JSON_NAME).is_file() and (directory / report_output.MARKDOWN_NAME).is_file()
    assert report.files["report_json"] == str(directory / report_output.JSON_NAME)
    assert "lightning-compress report" in capsys.readouterr().out
    trainer.loggers[0].save()
    header = (directory / "metrics.csv").read_text().splitlines()[0]
    for key in ("compression/bytes_fp32", "compression/bytes_compressed", "compression/ratio", "compression/sparsity"):
        assert key in header, key


def _no_logger(root: Path) -> pl.Trainer:
    return pl.Trainer(logger=False, default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)


def test_without_logger_each_run_gets_a_fresh_directory_never_reused(tmp_path: Path) -> None:
    runs = tmp_path / report_output.RUNS_DIR
    first = report_output.decide_run_dir(_no_logger(tmp_path))
    (runs / "run_1").mkdir()  # taken by someone else in the meantime: skipped, not shared
    second = report_output.decide_run_dir(_no_logger(tmp_path))
    (runs / "run_0").rmdir()  # a gap below the count: still a new name
    third = report_output.decide_run_dir(_no_logger(tmp_path))
    assert [first, second, third] == [runs / "run_0", runs / "run_2", runs / "run_3"]
    assert all(d.is_dir() for d in (second, third))


@pytest.mark.parametrize("blocker", ["file", "file_parent"])
def test_a_default_root_dir_that_cannot_hold_a_run_is_refused_naming_it(tmp_path: Path, blocker: str) -> None:
    root = tmp_path / "not_a_directory"
    root.write_text("")
    if blocker == "file_parent":
        root = root / "below"
    with pytest.raises(ValueError, match=r"`default_root_dir`=.*not_a_directory.*cannot create this run's directory"):
        report_output.decide_run_dir(_no_logger(root))


def test_publish_on_other_ranks_writes_and_prints_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(report_output.rank_zero_only, "rank", 1)
    publish(_report(), trainer, _model(), tmp_path / "run")
    assert not list(tmp_path.rglob(report_output.JSON_NAME))
    assert "lightning-compress report" not in capsys.readouterr().out


def test_a_report_that_cannot_be_written_raises_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    def full_disk(handle) -> None:
        handle.write(b"{")
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file named

    real = io.atomic_write
    monkeypatch.setattr(report_output, "write_text",
                        lambda path, text: real(path, full_disk))
    with pytest.raises(OSError, match=r"No space left on device: '.*compression_report\.md'") as info:
        save_report(_report(), _model(), tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".svg"]  # no partial file, no temporary file


def test_a_report_that_cannot_be_drawn_warns_and_writes_nothing_partial(tmp_path: Path, monkeypatch) -> None:
    def broken_figure(summary):
        raise RuntimeError("no backend")

    monkeypatch.setattr(report_output, "build_svg", broken_figure)
    with pytest.warns(UserWarning, match=r"could not render the compression report .*RuntimeError\('no backend'\)"):
        save_report(_report(), _model(), tmp_path)
    assert not list(tmp_path.iterdir())
