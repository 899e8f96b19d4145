"""``AdaptiveCompression`` with a latency budget, crashed and resumed from a checkpoint written after the schedule's
last pruning event, against the same fit run without interruption (review finding 4: no event rebuilt the planner
after the resume, so the end of the fit found no families for the kept plan, a raw ``KeyError``). ONNX Runtime's
timings stand in as a function of each graph's size (``stand_in_seconds``): the plan at the last event and after a
verdict is solved again on timings, which on a shared machine move from run to run, and what is compared here is
what the resume changes (the timing has the single-process tests of test_latency*.py)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import AdaptiveCompression, Budget
from lightning_compress.demos.data import DigitsDataModule
from tests.adaptive.ddp_latency_gate import stand_in_timings
from tests.adaptive.test_in_fit_units import LATENCY, SHAPE, _model

EPOCHS = 4  # 20 optimizer steps per epoch on the digits' training split
LAST_EVENT = 40  # the schedule's events at steps 20 and 40 (the first prunes nothing on this model)


def _callback() -> AdaptiveCompression:
    return AdaptiveCompression(budget=Budget(latency=LATENCY, latency_input=SHAPE), max_metric_drop=0.05,
                               start_step=20, end_step=LAST_EVENT, frequency=20)


def _fit(callback: AdaptiveCompression, root: Path, ckpt_path: Path | None = None) -> torch.nn.Module:
    model = _model()
    pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
               enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0, deterministic=True,
               callbacks=[callback, ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)]
               ).fit(model, datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    return model


def _widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_a_fit_resumed_after_its_last_event_delivers_the_uninterrupted_plan(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_timings(monkeypatch)
    whole = _callback()
    uninterrupted = _fit(whole, tmp_path / "whole")
    expected = whole.report.gate["adaptive"]
    # after epoch 1 the last event (step 40) is still held, its verdict due after the resume; after epoch 2 judged
    for name, held in (("epoch=1-step=40.ckpt", [LAST_EVENT]), ("epoch=2-step=60.ckpt", [])):
        checkpoint = tmp_path / "whole" / "ckpt" / name
        saved = torch.load(checkpoint, weights_only=False)["callbacks"]
        state = next(s for s in saved.values() if isinstance(s, dict) and "kept_plan" in s)
        assert state["kept_plan"] and [h["step"] for h in state["controller"]["history"]] == [LAST_EVENT]
        assert [h["step"] for h in state["recovery"]["held"]] == held
        resumed = _callback()
        model = _fit(resumed, tmp_path / name, ckpt_path=checkpoint)
        entry = resumed.report.gate["adaptive"]
        assert resumed.run.kept_plan == whole.run.kept_plan, name
        assert entry["delivered"]["kept_units"] == expected["delivered"]["kept_units"], name
        assert entry["recovery_gate"] == expected["recovery_gate"], name  # every held event judged alike
        assert [h["step"] for h in resumed.history] == [h["step"] for h in whole.history], name
        assert _widths(model) == _widths(uninterrupted) and sum(_widths(model)) < 32 + 64, name  # compacted alike
        assert entry["delivered"]["latency"] == expected["delivered"]["latency"] <= LATENCY, name
