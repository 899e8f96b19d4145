"""AdaptiveCompression and QuantizationAwareTraining in one fit on digits (issue 22, "lifecycle done right"): pruning
first, the budget's widths planned on the masks reached when QAT starts, trained, and delivered as trained. The file
on disk within the budget, its codes those the last validation used, pruned positions zero, the bound, the
refusals before any step, and a mid-QAT resume giving the same codes."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_compress import (
    AdaptiveCompression,
    Budget,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    load_compressed,
)
from lightning_compress.core.accounting import state_bytes
from lightning_compress.demos.data import DigitsDataModule, EpochSeededSampler, ResumableDataLoader
from lightning_compress.qat.model import latent
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.export import load_quantized_tensors
from tests.callbacks.test_adaptive import _model, _test_accuracy, _trainer

BUDGET = Budget(size=0.25, macs=0.6)
BOUND = 0.05  # accuracy points the delivered model may lose against the metric before the first pruning event
SLACK = 0.03  # the test split holds ~270 digits: a few may differ from validation
EPOCHS = 6  # 20 optimizer steps per epoch: pruning events at steps 10..60, QAT from step 90 (0.75 of 120)
PRUNING = dict(start_step=10, end_step=60, frequency=10)
KEYS = ("net.1.weight", "net.3.weight", "net.5.weight")


def _callbacks(**qat: Any) -> list[Callback]:
    return [AdaptiveCompression(budget=BUDGET, max_metric_drop=BOUND, export_path="model.safetensors", **PRUNING),
            QuantizationAwareTraining(start=0.75, **qat)]


def _fit(callbacks: list[Callback], root: Path, model: pl.LightningModule | None = None,
         ckpt_path: str | None = None, **kwargs: Any) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(0)
    model = model or _model()
    trainer = _trainer(callbacks, root, **{"epochs": EPOCHS, **kwargs})
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return trainer, model


class _QatSpy(Callback):
    """While QAT runs: the pruned positions of the weight the forward uses are zero after every step; the codes the
    last validation used (the quantizers' exact codes); the float model before the first pruning event."""

    def __init__(self) -> None:
        self.checked, self.codes, self.initial = 0, {}, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        if self.initial is None:
            self.initial = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        adaptive, qat = trainer.callbacks[0], trainer.callbacks[1]
        if qat.active:
            for name in qat.quantizers:
                weight = dict(pl_module.named_modules())[name].weight  # fake-quantized
                assert bool((weight[~adaptive.masks[f"{name}.weight"]] == 0).all()), name
            self.checked += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        qat = trainer.callbacks[1]
        modules = dict(pl_module.named_modules())
        self.codes = {f"{n}.weight": q.codes(latent(modules[n])) for n, q in qat.quantizers.items()}


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adaptive_qat")
    spy = _QatSpy()
    callbacks = _callbacks()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer, model = _fit([*callbacks, spy, checkpoints], root, enable_checkpointing=True)
    return {"root": root, "adaptive": callbacks[0], "qat": callbacks[1], "spy": spy, "model": model,
            "trainer": trainer}


def test_the_file_within_the_budget_holds_the_codes_qat_trained_bit_for_bit(composed: dict[str, Any]) -> None:
    adaptive, qat, spy, model = composed["adaptive"], composed["qat"], composed["spy"], composed["model"]
    export = Path(adaptive.report.files["quantized"])
    cap = math.floor(float(BUDGET.size) * sum(state_bytes(_model()).values()))
    assert export.stat().st_size <= cap and adaptive.result.file_bytes == export.stat().st_size
    assert adaptive.result.method == "qat" and qat.budget_plan is not None
    planned = {row["layer"]: row["bits"] for row in qat.budget_plan.rows}
    _, on_disk = load_quantized_tensors(export)
    assert set(on_disk) == set(spy.codes) == set(carried(model).codes) == set(KEYS)
    for key, codes in spy.codes.items():  # what the last validation used = what the model carries = the file
        assert codes.spec.bits == planned[key.removesuffix(".weight")]
        for delivered in (carried(model).codes[key], on_disk[key]):
            assert torch.equal(delivered.q, codes.q), key
            assert torch.equal(delivered.scale, codes.scale), key
    assert carried(model).stale(model) == []  # the weights are those codes, not re-rounded
    assert len({c.spec.bits for c in spy.codes.values()}) > 1 or len({r["label"] for r in qat.budget_plan.rows}) > 1


def test_pruned_positions_stay_zero_through_qat_and_in_the_file(composed: dict[str, Any]) -> None:
    adaptive, spy = composed["adaptive"], composed["spy"]
    assert spy.checked == 30  # every step from 90 to 119
    _, on_disk = load_quantized_tensors(adaptive.report.files["quantized"])
    pruned = 0
    for key in KEYS:
        keep = adaptive.masks[key]
        pruned += int((~keep).sum())
        assert bool((on_disk[key].q[~keep] == 0).all()), key
    assert pruned > 0
    cap = math.floor(float(BUDGET.macs) * sum(composed["model"].state_dict()[k].numel() for k in KEYS))
    assert adaptive.result.macs <= cap


def test_the_bound_holds_on_validation_and_on_the_test_split(composed: dict[str, Any]) -> None:
    adaptive, spy, model = composed["adaptive"], composed["spy"], composed["model"]
    assert adaptive.controller.initial_metric is not None
    initial = adaptive.controller.initial_metric
    assert initial - adaptive.result.metric_after <= BOUND
    before_pruning = _model()
    before_pruning.load_state_dict(spy.initial)
    assert _test_accuracy(before_pruning) - _test_accuracy(model) <= BOUND + SLACK


def test_compressed_checkpoint_loads_and_tests_on_the_delivered_model(composed: dict[str, Any]) -> None:
    adaptive, model = composed["adaptive"], composed["model"]
    path = adaptive.report.files["compressed_checkpoint"]
    fresh = load_compressed(_model(), path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    trainer = pl.Trainer(callbacks=_callbacks(), accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(composed["root"] / "test"))
    (result,) = trainer.test(_model(), DigitsDataModule(batch_size=64), ckpt_path=path, verbose=False)
    assert result["test_acc"] == pytest.approx(_test_accuracy(model), abs=1e-6)


def test_the_report_shows_the_plan_and_qat(composed: dict[str, Any]) -> None:
    adaptive, qat = composed["adaptive"], composed["qat"]
    entry = adaptive.report.gate["adaptive"]
    assert "QuantizationAwareTraining" in entry["quantization"]
    assert [row["layer"] for row in entry["plan"]] == ["net.1", "net.3", "net.5"]
    assert any(s.startswith("QAT trained the plan from step 90") and "delivered as trained" in s
               for s in entry["verification_steps"])
    assert entry["delivered"]["file_bytes"] <= entry["budget"]["bytes"]
    note = next(e.note for e in adaptive.report.events if e.kind == "quantize")
    assert "QAT trained the plan" in note
    assert qat.budget_plan.start_step == 90
    assert adaptive.report.settings["quantization"]["bits"] == "per layer, the budget's plan"  # not QAT's default 4


def test_a_mid_qat_resume_gives_the_same_codes(composed: dict[str, Any], tmp_path: Path) -> None:
    """From the checkpoint of epoch 4 (QAT from step 90, the checkpoint at step 100) to the end: the plan is the one
    saved (not planned again), and the codes delivered equal the uninterrupted run's."""
    ckpt = sorted((composed["root"] / "ckpt").glob("epoch=4-*.ckpt"))[0]
    saved = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items()
                 if k.startswith("QuantizationAwareTraining"))
    assert saved["active"] and saved["budget_plan"]["start_step"] == 90
    callbacks = _callbacks()
    calls: list[int] = []
    plan_widths = callbacks[0].plan_widths
    callbacks[0].plan_widths = lambda *a: calls.append(1) or plan_widths(*a)  # type: ignore[method-assign]
    _, model = _fit(callbacks, tmp_path, ckpt_path=str(ckpt))
    assert calls == []
    expected = carried(composed["model"]).codes
    for key, codes in carried(model).codes.items():
        assert torch.equal(codes.q, expected[key].q), key
        assert torch.equal(codes.scale, expected[key].scale), key
    assert callbacks[0].result.file_bytes == composed["adaptive"].result.file_bytes


# id, callbacks, error text (the arguments and values named)
REFUSED: list[tuple[str, Any, str]] = [
    ("qat_bits_given", lambda: _callbacks(bits=3), r"`bits`=3 would decide them"),
    ("qat_export_given", lambda: _callbacks(export_path="q.safetensors"), r"`export_path`='q.safetensors'"),
    ("qat_bound_given", lambda: _callbacks(max_metric_drop=0.01), r"`max_metric_drop`=0.01"),
    ("qat_before_last_event", lambda: [AdaptiveCompression(budget=BUDGET, start_step=10, end_step=110, frequency=10),
                                       QuantizationAwareTraining(start=0.75)],
     r"starts at optimizer step 90 but AdaptiveCompression\(.*\) ends at optimizer step 110"),
    ("latency_budget", lambda: [AdaptiveCompression(budget=Budget(latency=0.5, latency_input=(8, 64))),
                                QuantizationAwareTraining(start=0.75)], r"`budget` latency=0.5 delivers a compacted"),
    ("a_third_callback", lambda: [*_callbacks(), PostTrainingQuantization()],
     r"PostTrainingQuantization"),
]


@pytest.mark.parametrize(("callbacks", "match"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_before_the_first_step(callbacks: Any, match: str, tmp_path: Path) -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        _fit(callbacks(), tmp_path, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.rglob("*.safetensors"))


def test_trained_codes_refused_at_the_end_are_not_delivered_the_budget_is_planned_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the codes QAT trained miss a cap or the bound (forced here), they are not delivered: the model gets its
    latent float weights back and the verified compress() plans again from them, within the bound, or fails."""
    from lightning_compress.callbacks import adaptive_qat as module

    monkeypatch.setattr(module, "refusal", lambda *_: "a refusal forced by the test")
    callbacks = _callbacks()
    _, model = _fit(callbacks, tmp_path)
    adaptive = callbacks[0]
    result = adaptive.result
    assert result.method in ("rtn", "gptq") and carried(model).source.startswith("compress()")
    assert result.steps[0].startswith("QAT's codes (file ") and \
        result.steps[0].endswith("a refusal forced by the test; planned again from the latent weights")
    assert adaptive.controller.initial_metric - result.metric_after <= BOUND
    export = Path(adaptive.report.files["quantized"])
    assert export.stat().st_size == result.file_bytes <= result.budget_bytes
    _, on_disk = load_quantized_tensors(export)
    for key, codes in carried(model).codes.items():
        assert torch.equal(on_disk[key].q, codes.q), key


class _CodesFile(Callback):
    """Writes this rank's delivered codes (module level: ddp_spawn pickles the trainer)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        codes = {k: (c.q, c.scale) for k, c in carried(pl_module).codes.items()}
        adaptive = trainer.callbacks[0]
        torch.save({"codes": codes, "method": adaptive.result.method,
                    "plan": [(r["layer"], r["label"]) for r in adaptive.result.plan]},
                   Path(self.folder, f"rank{trainer.global_rank}.pt"))


@pytest.mark.ddp
def test_ddp_ranks_train_the_same_plan_and_deliver_identical_codes(tmp_path: Path) -> None:
    """Two processes (10 steps per epoch each): rank zero's plan at QAT's start on both, identical codes delivered,
    equal to the file rank zero wrote."""
    out = tmp_path / "out"
    out.mkdir()
    callbacks = [AdaptiveCompression(budget=BUDGET, max_metric_drop=0.1, export_path=str(out / "ddp.safetensors"),
                                     start_step=5, end_step=25, frequency=5),
                 QuantizationAwareTraining(start=0.75), _CodesFile(str(out))]
    _fit(callbacks, tmp_path, epochs=4, strategy="ddp_spawn", devices=2)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["method"] == ranks[1]["method"] == "qat" and ranks[0]["plan"] == ranks[1]["plan"]
    _, on_disk = load_quantized_tensors(out / "ddp.safetensors")
    assert set(ranks[0]["codes"]) == set(ranks[1]["codes"]) == set(on_disk) == set(KEYS)
    for key in KEYS:
        for rank in ranks:
            assert torch.equal(rank["codes"][key][0], on_disk[key].q), key
            assert torch.equal(rank["codes"][key][1], on_disk[key].scale), key


def test_an_error_while_the_trained_codes_are_checked_gives_the_latent_weights_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception after the trained codes were carried (here a full /tmp while their file is measured) puts the
    latent float weights back and forgets the codes, not only a refusal."""
    import errno

    from lightning_compress.callbacks import adaptive_qat as module

    seen: dict[str, dict[str, torch.Tensor]] = {}
    real_carry = module.carry

    def spy_carry(model: torch.nn.Module, codes: Any, source: str) -> Any:
        seen["latent"] = copy.deepcopy(model.state_dict())
        return real_carry(model, codes, source)

    def full_tmp(model: torch.nn.Module) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/plan.safetensors")

    monkeypatch.setattr(module, "carry", spy_carry)
    monkeypatch.setattr(module, "file_bytes", full_tmp)
    callbacks = [AdaptiveCompression(budget=BUDGET, max_metric_drop=BOUND, export_path="model.safetensors",
                                     start_step=10, end_step=30, frequency=10), QuantizationAwareTraining(start=0.75)]
    model = _model()
    with pytest.raises(OSError, match="No space left"):
        _fit(callbacks, tmp_path, model=model, epochs=3)
    assert carried(model) is None
    state = model.state_dict()
    assert set(state) == set(seen["latent"])
    for key in KEYS:
        assert torch.equal(state[key], seen["latent"][key]), key
    assert not list(tmp_path.rglob("model.safetensors"))


def test_the_budget_plan_is_kept_in_the_state_when_every_layer_stays_float() -> None:
    """A plan keeping every layer float never activates QAT: its state still holds the plan, so a resumed fit does
    not plan again."""
    from lightning_compress.adaptive.with_qat import BudgetPlan

    qat = QuantizationAwareTraining(start=0.75)
    plan = BudgetPlan([{"layer": "net.1", "bits": 32}], 1000, None, 0.9, ["planned"], 3, 40)
    qat.budget_plan = plan
    state = qat.state_dict()
    assert not qat.active and state["budget_plan"] == plan.state()
    resumed = QuantizationAwareTraining(start=0.75)
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.budget_plan == plan and not resumed.active


def test_qat_finds_its_budget_peer_without_importing_adaptive_compression() -> None:
    """No import cycle callbacks/qat.py <-> callbacks/adaptive.py (not even one hidden in a function)."""
    import lightning_compress.callbacks.qat as qat_module

    source = Path(qat_module.__file__).read_text()
    assert "callbacks.adaptive" not in source and "import AdaptiveCompression" not in source


class _PersistentDigits(DigitsDataModule):
    """Digits with a persistent-workers training loader: ``DataLoader.__iter__`` then resets the iterator the fit is
    consuming, so any read of the loader mid-fit would replay and skip batches of that epoch."""

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = self._splits["train"]
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=EpochSeededSampler(len(dataset), 0),
                                   num_workers=1, persistent_workers=True)


class _BatchSums(Callback):
    def __init__(self) -> None:
        self.sums: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any) -> None:
        self.sums.append(float(batch[0].double().sum()))


def test_the_plan_at_qat_start_leaves_the_fits_batches_as_they_were(tmp_path: Path) -> None:
    """QAT starts mid-epoch (step 45 of 20 per epoch); its plan's calibration batches are those the fit fed, so the
    fit trains on the same batches, in the same order, as a fit without the callbacks."""
    runs = []
    for compressed in (False, True):
        pl.seed_everything(0)
        sums = _BatchSums()
        callbacks = [AdaptiveCompression(budget=BUDGET, max_metric_drop=BOUND, start_step=10, end_step=30,
                                         frequency=10), QuantizationAwareTraining(start=0.75)] if compressed else []
        _trainer([*callbacks, sums], tmp_path / str(compressed), epochs=3).fit(_model(), _PersistentDigits(64))
        runs.append(sums.sums)
        if compressed:
            assert callbacks[1].budget_plan is not None and callbacks[1].budget_plan.start_step == 45
    assert len(runs[0]) == 60 and runs[1] == runs[0]


def test_a_resume_before_qats_plan_plans_on_the_same_batches_whatever_the_callback_order(
        composed: dict[str, Any], tmp_path: Path) -> None:
    """From the checkpoint of epoch 3 (step 80; QAT plans at step 90 on the first batches the fit fed): the
    checkpoint carries those batches, so the resumed fit, QAT listed first this time (its batch hook runs before
    AdaptiveCompression has seen a batch), plans on them and delivers the uninterrupted run's codes (review 17)."""
    ckpt = sorted((composed["root"] / "ckpt").glob("epoch=3-*.ckpt"))[0]
    states = torch.load(ckpt, weights_only=False)["callbacks"]
    saved = next(v for k, v in states.items() if k.startswith("AdaptiveCompression"))
    assert len(saved["qat_calibration_batches"]) == composed["adaptive"].calibration_batches
    callbacks = _callbacks()[::-1]
    _, model = _fit(callbacks, tmp_path, ckpt_path=str(ckpt))
    assert callbacks[0].budget_plan.rows == composed["qat"].budget_plan.rows
    expected = carried(composed["model"]).codes
    for key, codes in carried(model).codes.items():
        assert torch.equal(codes.q, expected[key].q), key
        assert torch.equal(codes.scale, expected[key].scale), key
