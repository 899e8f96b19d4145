"""Structured pruning + compaction + per-group quantization in one fit: the compacted widths land on the
quantizer's grid (``round_to`` set from its ``group_size``), and what cannot is refused before training."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
from torch import nn

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from tests.helpers import quiet_trainer, report_of


def test_compacted_widths_are_multiples_of_the_group_size() -> None:
    pl.seed_everything(0)
    model = MLPClassifier(input_size=64, hidden=[128, 96])
    pruning = GradientStabilityPruning(sparsity=0.45, structured=True, compact=True, start_step=5, end_step=40,
                                       frequency=5, evaluate=False)
    quantization = PostTrainingQuantization(bits=4, granularity="per_group", group_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer([pruning, quantization], max_epochs=3)
        trainer.fit(model, DigitsDataModule(batch_size=64))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [m.in_features for m in linears][1:] != [128, 96]  # really compacted
    assert all(m.in_features % 32 == 0 for m in linears), [m.in_features for m in linears]
    assert not [w for w in caught if "per channel" in str(w.message) or "per_channel" in str(w.message)]
    settings = report_of(trainer).settings["pruning"]
    assert settings["round_to"] == 32 and "group_size=32" in settings["round_to_set_by"]
    assert pruning.config.round_to == 1  # the user's setting is unchanged; the fit's is the grid's
    # after compaction the figures stay those the fit delivered, and MACs are per example
    kept = [m.in_features for m in linears][1:]
    assert pruning.current_sparsity() == pytest.approx(1 - sum(kept) / (128 + 96))
    dense, compacted = 64 * 128 + 128 * 96 + 96 * 10, 64 * kept[0] + kept[0] * kept[1] + kept[1] * 10  # weights
    assert pruning.weight_sparsity() == pytest.approx(1 - compacted / dense)  # rows and the columns they fed
    report = report_of(trainer)
    assert (report.macs_before, report.macs_after) == (dense, compacted)  # one example: a MAC per weight


def test_a_layer_off_the_grid_is_refused_before_training() -> None:
    model = MLPClassifier(input_size=64, hidden=[48])  # dense widths fit group_size 16, but not the asked round_to 32
    pruning = GradientStabilityPruning(sparsity=0.3, structured=True, compact=True, evaluate=False, round_to=32)
    quantization = PostTrainingQuantization(bits=4, granularity="per_group", group_size=16)
    trainer = quiet_trainer([pruning, quantization], max_steps=3)
    with pytest.raises(ValueError) as info:
        trainer.fit(model, DigitsDataModule(batch_size=64))
    assert "'net.1': '48 units'" in str(info.value) and "multiples of 32" in str(info.value)
    assert trainer.global_step == 0
