"""2-process ``strategy="ddp"`` fit of ``AdaptiveCompression`` with a latency budget and a size cap together, for
``tests/callbacks/test_adaptive_latency_caps.py``: run as a script (``python tests/callbacks/ddp_latency_caps.py
OUT_DIR [int8]``); Lightning re-runs the same command line for rank 1. Each rank writes what it decided to
``OUT_DIR/rank<r>.json``. ONNX Runtime's timings stand in by graph size, offset on rank 1
(:func:`~tests.adaptive.ddp_latency_gate.stand_in_seconds`): a rank deciding on its own timings would record other
ratios, plans or codes. ``int8``: the compacted model's ratio is stood in over the budget, so int8 is planned."""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
import torch

from lightning_compress import AdaptiveCompression, Budget
from lightning_compress.adaptive import in_fit_units, latency, latency_caps
from lightning_compress.callbacks import adaptive_latency
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.quantization.carried import carried
from tests.adaptive.ddp_latency_gate import stand_in_seconds
from tests.adaptive.test_in_fit_units import LATENCY, SHAPE, _model


class Record(pl.Callback):
    """Writes this rank's plan, what was delivered and a digest of the weights and codes."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, AdaptiveCompression))
        entry = callback.report.gate["adaptive"]
        record = carried(pl_module)
        codes = {k: int(q.q.long().sum()) for k, q in sorted(record.codes.items())} if record is not None else {}
        out = {"kept": callback.run.kept_plan, "then": entry["then"], "delivered": entry["delivered"],
               "plan": [(r["layer"], r["bits"]) for r in entry["plan"]], "codes": codes,
               "ranges": sorted(record.activations.items()) if record is not None else [],
               "weights": float(sum(p.double().sum() for p in pl_module.parameters()))}
        (Path(self.folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out, sort_keys=True))


def main(out: str, int8: bool) -> None:
    latency.measure = in_fit_units.measure = stand_in_seconds  # type: ignore[assignment]
    if int8:
        real = latency_caps.next_budget
        adaptive_latency.next_budget = lambda b, c, r, m: real(b, c, max(r, LATENCY * 1.2), m)  # type: ignore
    size = 0.2 if int8 else 0.1
    callback = AdaptiveCompression(budget=Budget(latency=LATENCY, latency_input=SHAPE, size=size), start_step=5,
                                   end_step=30, frequency=5, max_metric_drop=0.05, export_path="m.safetensors")
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=out, num_sanity_val_steps=0, callbacks=[callback, Record(out)])
    trainer.fit(_model(), datamodule=DigitsDataModule(batch_size=64))
    assert torch.distributed.is_initialized()


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "int8")
