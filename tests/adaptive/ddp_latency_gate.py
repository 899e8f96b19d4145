"""2-process ``strategy="ddp"`` fit of ``AdaptiveCompression`` with a latency budget and a metric bound, for
``tests/adaptive/test_in_fit_units.py``: run as a script (``python tests/adaptive/ddp_latency_gate.py OUT_DIR``);
Lightning re-runs the same command line for rank 1. Each rank writes what it decided to ``OUT_DIR/rank<r>.json``.
(``ddp_spawn`` is refused with compaction: its main process cannot take the compacted weights back.)"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
import torch

from lightning_compress import AdaptiveCompression, Budget
from lightning_compress.adaptive import in_fit_units, latency
from lightning_compress.demos.data import DigitsDataModule
from tests.adaptive.test_in_fit_units import LATENCY, SHAPE, _model


class Record(pl.Callback):
    """Writes this rank's plan, the gate's verdicts, compacted widths and weights."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, AdaptiveCompression))
        entry = callback.report.gate["adaptive"]
        record = {"kept": callback.run.kept_plan, "replans": callback.run.replans,
                  "widths": [m.out_channels for m in pl_module.modules() if isinstance(m, torch.nn.Conv2d)],
                  "latency": entry["delivered"]["latency"], "gate": entry["recovery_gate"],
                  "history": [(h["step"], h["accepted"], h["metric_before"], h["metric_after"])
                              for h in callback.history],
                  "weights": float(sum(p.double().sum() for p in pl_module.parameters()))}
        (Path(self.folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, sort_keys=True))


def stand_in_seconds(graphs: Mapping[str, bytes], shapes: Mapping[str, Any], threads: int,
                     **_: Any) -> dict[str, float]:
    """Seconds per run of each graph from its size, deterministic, and on rank 1 offset by a fixed amount so that
    its ratios differ from rank zero's: two ranks timing ORT at once on a shared 2-core machine made the scenario
    fail on noise (a LatencyBudgetError), while what it tests is that every rank takes rank zero's plans and
    verdicts (a rank deciding on its own timings would record other ratios, plans or widths). The timing itself
    has the single-process tests of test_latency*.py."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return {name: len(graph) * 1e-9 + (2e-5 if rank == 1 else 0.0) for name, graph in graphs.items()}


def stand_in_timings(monkeypatch: Any) -> None:
    """Every ONNX Runtime timing of the latency path (``latency.measure``, and ``in_fit_units``' import of it) made
    :func:`stand_in_seconds` for one test (``monkeypatch``: pytest's fixture)."""
    for module in (latency, in_fit_units):
        monkeypatch.setattr(module, "measure", stand_in_seconds)


def main(out: str) -> None:
    latency.measure = in_fit_units.measure = stand_in_seconds  # type: ignore[assignment]  # see stand_in_seconds
    callback = AdaptiveCompression(budget=Budget(latency=LATENCY, latency_input=SHAPE), start_step=5, end_step=30,
                                   frequency=5, max_metric_drop=0.05)  # each event judged after recovery
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=out, num_sanity_val_steps=0, callbacks=[callback, Record(out)])
    trainer.fit(_model(), datamodule=DigitsDataModule(batch_size=64))


if __name__ == "__main__":
    main(sys.argv[1])
