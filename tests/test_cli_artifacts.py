"""The CLI's ``validate`` / ``test`` / ``predict`` accept every artifact of a fit as ``--ckpt_path``, and the
built-in job can be copied as a config and edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_compress.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / config), "--trainer.max_epochs=2",
          "--trainer.limit_train_batches=20", "--trainer.enable_checkpointing=false", *FAST])
    (report,) = tmp_path.rglob("compression_report.json")
    return report.parent


def _test_accuracy(config: str, ckpt: Path, capsys: pytest.CaptureFixture, *extra: str) -> float:
    capsys.readouterr()
    main(["test", "--config", str(ROOT / "configs" / config), "--ckpt_path", str(ckpt), *FAST, *extra])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "test_acc" in ln)
    return float(line.replace("│", " ").split()[-1])


def test_test_subcommand_evaluates_the_quantized_export_and_the_compressed_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run = _fit("quantize.yaml", tmp_path, monkeypatch)
    report = json.loads((run / "compression_report.json").read_text())
    export = Path(report["files"]["quantized"]["path"])
    from_export = _test_accuracy("quantize.yaml", export, capsys)
    from_checkpoint = _test_accuracy("quantize.yaml", run / "compressed.ckpt", capsys)
    assert from_export == pytest.approx(from_checkpoint, abs=1e-4)
    assert from_export == pytest.approx(report["delivered"]["test"], abs=1e-4)
    no_callbacks = _test_accuracy("quantize.yaml", run / "compressed.ckpt", capsys, "--trainer.callbacks=[]")
    assert no_callbacks == pytest.approx(from_checkpoint, abs=1e-4)  # compressed.ckpt needs no compression callback


def test_test_subcommand_rebuilds_compacted_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run = _fit("prune.yaml", tmp_path, monkeypatch)
    report = json.loads((run / "compression_report.json").read_text())
    assert (run / "model.compact.safetensors").is_file()
    for artifact in (run / "compressed.ckpt", run / "model.compact.safetensors"):
        assert _test_accuracy("prune.yaml", artifact, capsys) == pytest.approx(report["delivered"]["test"], abs=1e-4)


def test_a_foreign_file_as_ckpt_path_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(ROOT / "configs" / "quantize.yaml"), "--ckpt_path", str(bogus), *FAST])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "`--ckpt_path`" in err and "x.safetensors" in err and "Traceback" not in err


def test_the_builtin_job_can_be_printed_edited_and_run(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    callbacks = {c["class_path"]: c["init_args"] for c in config["trainer"]["callbacks"]}
    assert callbacks["lightning_compress.GradientStabilityPruning"]["sparsity"] == 0.7
    assert callbacks["lightning_compress.PostTrainingQuantization"]["bits"] == 4
