"""``configs/budget.yaml`` run through the CLI: AdaptiveCompression built from YAML (the budget as a mapping), a short
fit on MNIST-5k, and the exported file within the budget as written on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lightning_compress.cli import main
from lightning_compress.core.accounting import state_bytes
from lightning_compress.demos.models import MLPClassifier

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "budget.yaml"
SHORT = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=20", "--trainer.limit_val_batches=4",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.enable_checkpointing=false"]


def test_the_budget_config_runs_and_its_export_fits_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIG), *SHORT])
    log_dir = tmp_path / "runs" / "budget" / "lightning_logs" / "version_0"
    report = json.loads((log_dir / "compression_report.json").read_text())
    settings = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"][0]["init_args"]
    fraction = settings["budget"]["size"]
    model = MLPClassifier(**yaml.safe_load(CONFIG.read_text())["model"]["init_args"])
    cap = math.floor(fraction * sum(state_bytes(model).values()))
    export = log_dir / settings["export_path"]
    assert export.stat().st_size <= cap
    assert report["files"]["quantized"]["path"] == str(export.resolve())
    # every budget field the callback reports, None where the YAML leaves it out (a latency budget is one of them)
    assert report["settings"]["adaptive"]["budget"] == {"size": None, "macs": None, "latency": None,
                                                        **settings["budget"]}
    assert report["failure"] is None
