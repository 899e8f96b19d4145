"""AdaptiveCompression's bound at the end of a fit on digits: the report's delivered metric is the quantized model's
(not the last validation of the float one), measured once per set of weights, against the metric before the first
pruning event; a pruned model already outside the bound ends the fit with BudgetError, alone or with QAT."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_compress import AdaptiveCompression, Budget, QuantizationAwareTraining
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.integration import evaluation
from lightning_compress.quantization.carried import carried
from tests.callbacks.test_adaptive import _model, _test_accuracy, _trainer

BOUND = 0.05
TIGHT = Budget(size=0.17, macs=0.5)  # round to nearest at this size moves the validation metric of the pruned model
PRUNING = dict(start_step=10, end_step=30, frequency=10)


def _digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Evaluations(Callback):
    """From the end of training on: the weights of each full evaluation, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on, self.weights = False, []
        real = evaluation.evaluate

        def counted(trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> float:
            if self.on:
                self.weights.append(_digest(pl_module))
            return real(trainer, pl_module, *args, **kwargs)

        monkeypatch.setattr(evaluation, "evaluate", counted)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on = True


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("adaptive_bound")
    pl.seed_everything(0)
    spy = _Evaluations(monkeypatch)
    callback = AdaptiveCompression(budget=TIGHT, max_metric_drop=BOUND, method="rtn", **PRUNING)
    model = _model()
    try:
        _trainer([spy, callback], root, epochs=3).fit(model, DigitsDataModule(batch_size=64))
    finally:
        monkeypatch.undo()
    return {"callback": callback, "model": model, "spy": spy}


def test_the_delivered_metric_is_the_quantized_models_not_the_last_validation(tight: dict[str, Any]) -> None:
    callback, model = tight["callback"], tight["model"]
    assert carried(model) is not None
    measured = _test_accuracy(model, "val")
    assert callback.report.metric_after == pytest.approx(measured, abs=1e-6)
    assert callback.report.delivered_metric == pytest.approx(measured, abs=1e-6)
    assert callback.result.metric_before != pytest.approx(measured, abs=1e-6)  # quantization moved the metric here


def test_the_headline_drop_is_against_the_metric_before_the_first_pruning_event(tight: dict[str, Any]) -> None:
    callback = tight["callback"]
    initial = callback.controller.initial_metric
    assert initial is not None
    assert callback.report.metric_before == initial
    assert initial - callback.report.metric_after <= BOUND + 1e-9


def test_the_bound_left_and_the_plans_reference_are_one_evaluation(tight: dict[str, Any]) -> None:
    """The pruned model is measured once at the end: the drop pruning spent and compress()'s metric before come
    from the same evaluation (the next one measures a plan's codes)."""
    weights = tight["spy"].weights
    assert len(weights) >= 2
    assert weights[0] != weights[1], weights


class _Drift(Callback):
    """Listed first: moves one output bias when training ends (the metric drifting after the last pruning event,
    which only event time gates), then keeps the weights as they are after it (QAT's latent weights under their
    plain names)."""

    state: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            pl_module.net[5].bias[0] += 40.0
        state = copy.deepcopy(pl_module.state_dict())
        self.state = {k.replace("parametrizations.", "").replace(".original", ""): v for k, v in state.items()}


@pytest.mark.parametrize("with_qat", [False, True], ids=["alone", "with_qat"])
def test_a_pruned_model_outside_the_bound_at_the_end_fails_with_the_floats_back(tmp_path: Path,
                                                                                 with_qat: bool) -> None:
    pl.seed_everything(0)
    drift = _Drift()
    callback = AdaptiveCompression(budget=Budget(size=0.3, macs=0.5), max_metric_drop=BOUND, method="rtn",
                                   export_path="model.safetensors", **PRUNING)
    callbacks: list[Callback] = [drift, callback] + ([QuantizationAwareTraining(start=0.75)] if with_qat else [])
    model = _model()
    with pytest.raises(BudgetError, match="before the first pruning event") as info:
        _trainer(callbacks, tmp_path, epochs=3).fit(model, DigitsDataModule(batch_size=64))
    assert "`max_metric_drop`=0.05" in str(info.value)
    assert callback.report.failure is not None and "BudgetError" in callback.report.failure
    assert carried(model) is None
    assert drift.state is not None
    assert all(torch.equal(drift.state[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.rglob("model.safetensors"))
