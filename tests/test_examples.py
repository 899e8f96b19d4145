"""Every script in ``examples/`` runs as written, on a small budget, and leaves what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def _report(out: Path) -> dict:
    (path,) = out.glob("lightning_logs/version_*/compression_report.json")
    return json.loads(path.read_text())


def test_every_example_is_tested() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == {"train_and_compress.py", "compress_pretrained.py", "ddp_cpu.py"}


def test_train_and_compress(tmp_path: Path) -> None:
    out = tmp_path / "run"
    stdout = _run("train_and_compress.py", "--max-epochs", "1", "--limit-batches", "6", "--out", str(out), cwd=tmp_path)
    assert "test accuracy of the reloaded int4 export" in stdout
    report = _report(out)
    assert report["sparsity"] > 0 and report["bytes_compressed"] < report["bytes_fp32"]
    (export,) = out.glob("lightning_logs/version_*/model.int4.safetensors")  # in the run's log directory
    assert report["files"]["quantized"]["path"] == str(export.resolve())


def test_compress_pretrained(tmp_path: Path) -> None:
    out = tmp_path / "run"
    stdout = _run("compress_pretrained.py", "--epochs", "2", "--out", str(out), cwd=tmp_path)
    assert "compacted int4 (reloaded)" in stdout
    sizes = [(out / name).stat().st_size for name in
             ("model.fp32.safetensors", "model.compact.fp32.safetensors", "model.compact.int4.safetensors")]
    assert sizes == sorted(sizes, reverse=True) and sizes[2] < sizes[0] / 4


@pytest.mark.ddp
def test_ddp_cpu(tmp_path: Path) -> None:
    out = tmp_path / "run"
    stdout = _run("ddp_cpu.py", "--max-epochs", "1", "--limit-batches", "4", "--out", str(out), cwd=tmp_path)
    assert stdout.count("lightning-compress report") == 1  # rank 0 only
    report = _report(out)
    assert report["bytes_compressed"] < report["bytes_fp32"]
    assert {e["kind"] for e in report["events"]} >= {"quantize"}
    assert len(list(out.glob("lightning_logs/version_*/model.int8.safetensors"))) == 1
