"""GradientStabilityPruning inside real `Trainer.fit` runs (sklearn digits; MNIST-5k for the accuracy test)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_compress import GradientStabilityPruning
from lightning_compress.demos.data import DigitsDataModule, MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier, SmallCNN
from tests.helpers import GradSpy, StopAfterEpoch, quiet_trainer

_trainer = quiet_trainer


def _mlp(**kwargs) -> MLPClassifier:
    return MLPClassifier(input_size=64, hidden=[64, 32], **kwargs)


class _SGDMomentumMLP(MLPClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


# --------------------------------------------------------------------------- statistics in the loop
@pytest.mark.parametrize("accumulate", [1, 3])
def test_statistics_are_those_of_each_optimizer_step(accumulate: int) -> None:
    """Under accumulation the stats see the summed gradient of each optimizer step, never a partial one."""
    pl.seed_everything(1)
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=12, evaluate=False)
    spy = GradSpy("net.1")
    trainer = _trainer([pruning, spy], max_epochs=1, max_steps=12, accumulate_grad_batches=accumulate)
    trainer.fit(_mlp(), DigitsDataModule(batch_size=32))
    stats = pruning.stats
    assert stats is not None and stats.count == len(spy.grads) == 12
    assert stats.weight_every == 2 and stats.weight_count == 6  # the default samples every 2nd step
    ref = torch.stack([g.double() for g in spy.grads[::2]])
    index = list(pruning.layers.modules).index("net.1")  # the gradient of the first Linear
    # the one-shot event at the last step reads (and merges) the stats; compare with the reference
    torch.testing.assert_close(stats.weight_mean()[index].double(), ref.mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(stats.weight_std()[index].double(), ref.std(0, unbiased=False), rtol=1e-3, atol=1e-6)


class _NaNOnce(Callback):
    """Poisons the gradients of one step with NaN before the pruning callback reads them, then zeroes them so
    the optimizer step is harmless (what a GradScaler skip looks like from the statistics' side)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad.fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad.zero_()


@pytest.mark.parametrize(("step", "skipped"), [(2, 1), (3, 0)], ids=["sampled", "between_samples"])
def test_nan_step_is_not_counted(step: int, skipped: int) -> None:
    """The per-weight statistics sample every 2nd step (the default): a NaN step they sample is skipped, one in
    between is not read at all; neither reaches the statistics."""
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=8, evaluate=False)
    trainer = _trainer([_NaNOnce(step=step), pruning], max_epochs=1, max_steps=8)
    trainer.fit(_mlp(), DigitsDataModule(batch_size=32))
    assert pruning.stats.skipped_steps == skipped
    assert pruning.stats.count == 8 - skipped and pruning.stats.weight_count == 4
    assert all(torch.isfinite(m).all() for m in pruning.stats.weight_mean())
    assert all(torch.isfinite(s).all() for s in pruning.stats.weight_std())
    assert math.isclose(pruning.current_sparsity(), 0.5, abs_tol=1e-3)


def test_bf16_mixed_precision_collects_finite_statistics() -> None:
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=6, evaluate=False)
    trainer = _trainer([pruning], max_epochs=1, max_steps=6, precision="bf16-mixed")
    trainer.fit(_mlp(), DigitsDataModule(batch_size=32))
    assert pruning.stats.count == 6 and pruning.stats.skipped_steps == 0
    assert all(torch.isfinite(m).all() and m.abs().sum() > 0 for m in pruning.stats.weight_mean())


# --------------------------------------------------------------------------- masks
class _ZeroWatcher(Callback):
    """After every batch, checks that every pruned weight is still exactly zero."""

    def __init__(self, pruning: GradientStabilityPruning) -> None:
        self.pruning = pruning
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = dict(pl_module.named_parameters())
        for name, keep in self.pruning.masks.items():
            assert torch.count_nonzero(params[name].detach()[~keep]) == 0, f"{name} revived at {trainer.global_step}"
            self.checked += 1


@pytest.mark.parametrize("model_cls", [_SGDMomentumMLP, MLPClassifier], ids=["sgd-momentum-wd", "adamw-wd"])
def test_pruned_weights_stay_zero_through_optimizer_steps(model_cls) -> None:
    pruning = GradientStabilityPruning(sparsity=0.7, schedule="one_shot", start_step=5, evaluate=False)
    watcher = _ZeroWatcher(pruning)
    model = model_cls(input_size=64, hidden=[64, 32], weight_decay=0.05) if model_cls is MLPClassifier else model_cls(
        input_size=64, hidden=[64, 32]
    )
    trainer = _trainer([pruning, watcher], max_epochs=2)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert watcher.checked > 30
    assert pruning.weight_sparsity() >= 0.7 - 1e-3
    # the optimizer's momentum / moments are zero at pruned positions too
    optimizer = trainer.optimizers[0]
    params = dict(model.named_parameters())
    for name, keep in pruning.masks.items():
        for value in optimizer.state[params[name]].values():
            if isinstance(value, torch.Tensor) and value.shape == keep.shape:
                assert torch.count_nonzero(value[~keep]) == 0


def test_state_dict_has_original_keys_and_reloads_strictly() -> None:
    model = SmallCNN(image_size=8, channels=[8, 16], hidden=32)
    keys = set(model.state_dict())
    pruning = GradientStabilityPruning(sparsity=0.6, structured=True, schedule="one_shot", start_step=5, evaluate=False)
    _trainer([pruning], max_epochs=1).fit(model, DigitsDataModule(batch_size=32))
    state = model.state_dict()
    assert set(state) == keys
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    fresh = SmallCNN(image_size=8, channels=[8, 16], hidden=32)
    fresh.load_state_dict(state, strict=True)
    x = torch.rand(4, 1, 8, 8)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))


def test_structured_pruning_removes_whole_units() -> None:
    model = _mlp()
    pruning = GradientStabilityPruning(sparsity=0.5, structured=True, schedule="one_shot", start_step=5, evaluate=False,
                                       include=[r"net\.1$", r"net\.3$"])
    _trainer([pruning], max_epochs=1).fit(model, DigitsDataModule(batch_size=32))
    first = model.net[1]
    dead = first.weight.detach().abs().sum(dim=1) == 0
    assert 0 < int(dead.sum()) < first.out_features
    assert torch.all(first.bias.detach()[dead] == 0)
    assert math.isclose(pruning.current_sparsity(), 0.5, abs_tol=0.02)


class _OutputsAtTrainEnd(Callback):
    """Listed before the pruning callback: records the masked model's outputs just before it finalises."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.outputs: torch.Tensor | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.eval()
        with torch.no_grad():
            self.outputs = pl_module(self.x)


def test_compact_removes_units_and_keeps_the_outputs() -> None:
    model = SmallCNN(image_size=8, channels=[8, 16], hidden=32)
    params_before = sum(p.numel() for p in model.parameters())
    x = torch.rand(16, 1, 8, 8)
    spy = _OutputsAtTrainEnd(x)
    pruning = GradientStabilityPruning(sparsity=0.5, structured=True, scope="layer", schedule="one_shot",
                                       start_step=5, evaluate=False, compact=True)
    _trainer([spy, pruning], max_epochs=1).fit(model, DigitsDataModule(batch_size=32))
    assert model.net[0].out_channels == 4 and model.net[4].out_channels == 8 and model.net[9].out_features == 16
    assert model.net[-1].out_features == 10  # the output layer never loses units
    assert sum(p.numel() for p in model.parameters()) < params_before
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), spy.outputs, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- resume
def _resume_setup(tmp_path, stop_after: int | None = None, ckpt_path: str | None = None):
    pl.seed_everything(7)
    pruning = GradientStabilityPruning(sparsity=0.8, schedule="polynomial", start_step=5, end_step=70, frequency=5,
                                       evaluate=False)
    callbacks: list[Callback] = [pruning]
    if stop_after is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1))
        callbacks.append(StopAfterEpoch(stop_after))
    trainer = _trainer(callbacks, max_epochs=4, enable_checkpointing=stop_after is not None)
    model = _mlp()
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return pruning, model


def test_resume_mid_pruning_gives_the_same_masks(tmp_path) -> None:
    # digits: 1257 training samples -> 20 steps per epoch; the ramp runs from step 5 to 70 (epochs 1-4)
    full, full_model = _resume_setup(tmp_path / "full")
    part, _ = _resume_setup(tmp_path / "part", stop_after=1)
    assert 0 < part.current_sparsity() < 0.8  # really stopped mid-pruning
    resumed, resumed_model = _resume_setup(tmp_path / "resumed", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert set(resumed.masks) == set(full.masks)
    for name in full.masks:
        assert torch.equal(resumed.masks[name], full.masks[name]), name
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


class _ReadsStepsInSetup(Callback):
    """What the pruning callback once did in ``setup``: set up the train data before Lightning restores a checkpoint
    (Lightning then skips restoring the loader's position, so the resumed epoch restarts)."""

    def setup(self, trainer, pl_module, stage) -> None:
        trainer.estimated_stepping_batches  # noqa: B018 - the read is the point


def _mid_epoch_fit(root, variant: str, ckpt_path: str | None = None):
    pl.seed_everything(7)
    if variant == "reads_steps_in_setup":
        callbacks: list[Callback] = [_ReadsStepsInSetup()]
    else:
        callbacks = [GradientStabilityPruning(sparsity=0.6, structured=variant == "structured_first_batch",
                                              start_step=5, end_step=60, frequency=5, evaluate=False)]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=7, save_top_k=-1))
    model = _mlp()
    if variant == "structured_first_batch":
        model.example_input_array = None  # analysed on the first batch the fit sees
    trainer = _trainer(callbacks, max_epochs=4, enable_checkpointing=ckpt_path is None, default_root_dir=root)
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return callbacks[0], model


@pytest.mark.parametrize("variant", ["unstructured", "structured_first_batch"])
def test_resume_from_mid_epoch_checkpoints_is_bit_exact(tmp_path, variant: str) -> None:
    # digits: 20 steps per epoch; checkpoints at steps 7 (epoch 0), 21 and 28 (epoch 1), all between pruning events
    full, full_model = _mid_epoch_fit(tmp_path / "full", variant)
    for step in (7, 21, 28):
        (ckpt,) = (tmp_path / "full").glob(f"*-step={step}.ckpt")
        resumed, model = _mid_epoch_fit(tmp_path / f"resumed{step}", variant, str(ckpt))
        assert full.masks and set(resumed.masks) == set(full.masks)
        for name in full.masks:
            assert torch.equal(resumed.masks[name], full.masks[name]), (step, name)
        for name, weight in full_model.state_dict().items():
            assert torch.equal(model.state_dict()[name], weight), (step, name)
        assert [h["tick"] for h in resumed.history] == [h["tick"] for h in full.history]


def test_reading_the_fit_length_in_setup_is_what_broke_mid_epoch_resume(tmp_path) -> None:
    """The control: without the pruning callback, a callback that only reads ``estimated_stepping_batches`` in
    ``setup`` already resumes a different fit (if Lightning fixes this, the pruning callback may read it there
    again)."""
    _, full_model = _mid_epoch_fit(tmp_path / "full", "reads_steps_in_setup")
    (ckpt,) = (tmp_path / "full").glob("*-step=7.ckpt")
    _, model = _mid_epoch_fit(tmp_path / "resumed", "reads_steps_in_setup", str(ckpt))
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in full_model.state_dict().items())


# --------------------------------------------------------------------------- bound and rollback
class _WeightsBeforeEvent(Callback):
    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.before:
            self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_a_step_breaking_the_bound_is_rolled_back_exactly() -> None:
    spy = _WeightsBeforeEvent(step=30)
    pruning = GradientStabilityPruning(sparsity=0.99, criterion="stability", schedule="one_shot", start_step=30,
                                       max_metric_drop=0.0, on_violation="stop", min_keep=0.0)
    after: dict[str, torch.Tensor] = {}

    class _After(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 30 and not after:
                after.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    # the spy must run before pruning at step 30, the checker after it
    trainer = _trainer([spy, pruning, _After()], max_epochs=2)
    trainer.fit(_mlp(lr=1e-2), DigitsDataModule(batch_size=64))
    assert pruning.history and pruning.history[0]["accepted"] is False
    assert pruning.masks == {} and pruning.controller.stopped
    assert pruning.current_sparsity() == 0.0
    for name, value in spy.before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("reference", ["previous", "initial"])
def test_backoff_lowers_the_target_and_keeps_the_bound(reference: str) -> None:
    pruning = GradientStabilityPruning(sparsity=0.97, schedule="constant", amount=0.6, start_step=40, frequency=10,
                                       max_metric_drop=0.05, on_violation="backoff", metric_reference=reference)
    _trainer([pruning], max_epochs=5).fit(_mlp(lr=1e-2), DigitsDataModule(batch_size=64))
    assert pruning.controller.initial_metric > 0.8
    accepted = [h for h in pruning.history if h["accepted"]]
    rejected = [h for h in pruning.history if not h["accepted"]]
    assert rejected, "a 95 % target on this small MLP should break a 5-point bound"
    for h in pruning.history:  # the gate's reference: the metric just before the event, or before the first one
        expected = h["metric_before"] if reference == "previous" else pruning.controller.initial_metric
        assert h["reference"] == expected
        assert h["drop"] == pytest.approx(h["reference"] - h["metric_after"])
    assert all(h["drop"] <= 0.05 + 1e-9 for h in accepted)
    assert all(h["drop"] > 0.05 for h in rejected)
    assert pruning.current_sparsity() < 0.95


# --------------------------------------------------------------------------- real data accuracy
@pytest.mark.slow
def test_80_percent_sparsity_within_2_points_of_dense_on_mnist() -> None:
    def run(callbacks) -> float:
        pl.seed_everything(0)
        model = MLPClassifier(input_size=784, hidden=[256, 128], lr=2e-3)
        dm = MNIST5kDataModule(batch_size=64)
        trainer = _trainer(callbacks, max_epochs=6)
        trainer.fit(model, dm)
        return trainer.validate(model, dm, verbose=False)[0]["val_acc"]

    dense = run([])
    pruning = GradientStabilityPruning(sparsity=0.8, evaluate=False)
    pruned = run([pruning])
    assert pruning.weight_sparsity() >= 0.8 - 1e-3
    assert pruned >= dense - 0.02, f"pruned {pruned:.4f} vs dense {dense:.4f}"


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"`sparsity`"),
        ({"sparsity": "half"}, r"`sparsity` must be a number"),
        ({"criterion": "random"}, r"`criterion` must be one of .*got 'random'"),
        ({"scope": "model"}, r"`scope` must be one of"),
        ({"schedule": "cosine"}, r"`schedule` must be one of"),
        ({"schedule_unit": "batch"}, r"`schedule_unit` must be one of"),
        ({"start_step": 50, "end_step": 10}, r"`end_step` \(10\) must not be before `start_step` \(50\)"),
        ({"start_step": 10, "end_step": 10}, r"`end_step` must be after `start_step`"),
        ({"schedule": "constant", "start_step": 0}, r"`start_step` must be an integer in \[1, inf\], got 0"),
        (
            {"schedule": "one_shot", "schedule_unit": "epoch", "start_step": 0},
            r"`start_step` must be an integer in \[1",
        ),
        ({"evaluate": "no"}, r"`evaluate` must be True or False, got .no."),
        ({"compact": "no", "structured": True}, r"`compact` must be True or False"),
        ({"include": "net.5"}, r"`include` must be a list of strings, got the string .net\.5."),
        ({"metric_reference": "first"}, r"`metric_reference` must be one of"),
        ({"verbose": 3}, r"`verbose` must be an integer in \[0, 2\]"),
        ({"frequency": 0}, r"`frequency` must be an integer in \[1"),
        ({"amount": 1.5}, r"`amount`"),
        ({"min_keep": 1.0}, r"`min_keep`"),
        ({"min_keep": 0.01, "sparsity": 0.99}, r"`min_keep`=0.01 reserves at least as many .* `sparsity`=0.99"),
        ({"restart_statistics": "yes"}, r"`restart_statistics` must be True or False, got .yes."),
        ({"initial_sparsity": 0.9, "sparsity": 0.5}, r"`initial_sparsity` \(0.9\) must not exceed"),
        ({"sparsity": None}, r"both `mean_threshold` and `std_threshold` must be given"),
        ({"mean_threshold": 1e-3, "std_threshold": 1e-3}, r"give either `sparsity`"),
        ({"sparsity": None, "mean_threshold": 1e-3, "std_threshold": -1.0}, r"`std_threshold`"),
        ({"sparsity": None, "mean_threshold": 1e-3, "std_threshold": 1e-3, "criterion": "magnitude"}, r"thresholds"),
        ({"statistics": "per_batch"}, r"`statistics` must be one of"),
        ({"structured": True, "statistics": "per_weight"}, r"`statistics`='per_weight' does not apply"),
        ({"module_types": []}, r"`module_types` must be a non-empty list of type names"),
        ({"module_types": ["Dense"]}, r"`module_types` entry 'Dense' is not a known module type"),
        ({"include": ["("]}, r"`include` entry '\(' is not a valid regular expression"),
        ({"metric": "torchmetrics.NoSuchMetric"}, r"`metric` must be the class path of a torchmetrics Metric"),
        ({"metric_kwargs": {"bogus": 1}}, r"`metric_kwargs`=\{'bogus': 1\} are not valid"),
        ({"max_metric_drop": -0.1}, r"`max_metric_drop`"),
        ({"on_violation": "ignore"}, r"`on_violation` must be one of"),
        ({"compact": True}, r"`compact`=True .* needs structured=True"),
    ],
)
def test_invalid_arguments_are_refused_in_the_constructor(kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        GradientStabilityPruning(**kwargs)


class _NoValidation(MLPClassifier):
    validation_step = None  # type: ignore[assignment]


def _fails_in_setup(callback: GradientStabilityPruning, model=None, match: str = "", **trainer_kwargs) -> None:
    watcher = _StepCounter()
    with pytest.raises(ValueError, match=match):
        _trainer([callback, watcher], max_epochs=1, **trainer_kwargs).fit(model or _mlp(), DigitsDataModule())
    assert watcher.steps == 0, "the error must come before the first training step"


class _StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def test_empty_module_selection_is_refused_before_training() -> None:
    _fails_in_setup(GradientStabilityPruning(include=["no_such_layer"]),
                    match=r"`include` entry 'no_such_layer'.*matches no module")
    frozen = MLPClassifier(input_size=64, hidden=[16])
    frozen.net.requires_grad_(False)
    _fails_in_setup(GradientStabilityPruning(), model=frozen, match=r"select no trainable module")


def test_bound_without_validation_data_is_refused_before_training() -> None:
    model = MLPClassifier(input_size=64, hidden=[16])
    _fails_in_setup(GradientStabilityPruning(max_metric_drop=0.01), model=model, match=r"needs validation data",
                    limit_val_batches=0)


def test_schedule_longer_than_the_fit_is_refused_before_training() -> None:
    _fails_in_setup(GradientStabilityPruning(start_step=5, end_step=10_000), match=r"does not fit in this fit's")


def test_unsupported_strategy_is_refused() -> None:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class DeepSpeedStrategy(SingleDeviceStrategy):  # named like a sharding strategy (the real one subclasses DDP)
        pass

    class UsersShardedStrategy(DeepSpeedStrategy):
        pass

    for cls in (DeepSpeedStrategy, UsersShardedStrategy):
        _fails_in_setup(GradientStabilityPruning(), match=rf"supports the strategies .* got {cls.__name__}",
                        strategy=cls(device=torch.device("cpu")))


def test_a_users_subclass_of_a_supported_strategy_is_accepted() -> None:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class MySingleDevice(SingleDeviceStrategy):
        pass

    watcher = _StepCounter()
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=1, evaluate=False)
    trainer = _trainer([pruning, watcher], max_steps=2, strategy=MySingleDevice(device=torch.device("cpu")))
    trainer.fit(_mlp(), DigitsDataModule())
    assert watcher.steps == 2 and pruning.current_sparsity() > 0.4


class _ResidualClassifier(MLPClassifier):
    """Digits 8x8 through a residual conv block: `stem` and `conv2` are added, so they share their channels."""

    def __init__(self) -> None:
        super().__init__(input_size=64, hidden=[8])
        self.net = torch.nn.Identity()
        self.stem, self.bn0 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv1, self.bn1 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        skip = torch.relu(self.bn0(self.stem(x)))
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(skip)))))
        return self.head(torch.relu(out + skip).mean((2, 3)))


def test_coupled_producers_share_one_mask_and_compact_together() -> None:
    model = _ResidualClassifier()
    x = torch.rand(16, 64)
    spy = _OutputsAtTrainEnd(x)
    pruning = GradientStabilityPruning(sparsity=0.5, structured=True, schedule="one_shot", start_step=5,
                                       evaluate=False, compact=True, exclude=[r"^head$"])
    _trainer([spy, pruning], max_epochs=1).fit(model, DigitsDataModule(batch_size=32))
    event = pruning.history[-1]
    assert math.isclose(event["sparsity"], 0.5, abs_tol=1e-6)  # over 2 unit sets of 8 (stem+conv2, conv1)
    # the shared channels went from both producers, so compaction removed them from the residual stream
    assert model.stem.out_channels == model.conv2.out_channels < 8
    assert model.stem.out_channels + model.conv1.out_channels == 8
    assert model.head.in_features == model.stem.out_channels
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), spy.outputs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("restart", [True, False])
def test_restart_statistics_counts_only_the_steps_since_the_last_event(restart: bool) -> None:
    pruning = GradientStabilityPruning(sparsity=0.8, schedule="constant", amount=0.2, start_step=5, frequency=5,
                                       evaluate=False, restart_statistics=restart)
    _trainer([pruning], max_epochs=-1, max_steps=12).fit(_mlp(), DigitsDataModule(batch_size=32))
    assert [e["step"] for e in pruning.history] == [5, 10]
    assert pruning.stats.count == (2 if restart else 12)


# --------------------------------------------------------------------------- a fit that diverged on its own
class _HalfMLP(MLPClassifier):
    """fp16 parameters trained by AdamW (eps 1e-8 is 0 in fp16): the weights become NaN / inf within a few steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.half()).float()


class _NaNWeightAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net[3].weight[0, 0] = float("nan")


@pytest.mark.parametrize("how", ["fp16_adamw", "nan_written"])
def test_a_model_not_finite_before_an_event_fails_the_fit_and_blames_the_fit(how: str) -> None:
    pl.seed_everything(0)
    model = _HalfMLP(input_size=64, hidden=[64, 32], lr=1e-2).half() if how == "fp16_adamw" else _mlp()
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=15)
    callbacks: list[Callback] = [pruning] if how == "fp16_adamw" else [_NaNWeightAt(12), pruning]
    trainer = _trainer(callbacks, max_epochs=1)
    with pytest.raises(RuntimeError) as info:
        trainer.fit(model, DigitsDataModule(batch_size=64))
    message = str(info.value)
    assert "not finite before the pruning event at step 15" in message and "fit diverged" in message
    assert "net.3.weight" in message
    assert "after the step" not in message  # the event is not blamed
    assert pruning.history == [] and pruning.masks == {}
    assert not list(Path(trainer.default_root_dir).rglob("compressed.ckpt"))


def test_two_pruning_callbacks_over_disjoint_layers_are_allowed() -> None:
    first, second = GradientStabilityPruning(include=["net.1"], schedule="one_shot", start_step=4, evaluate=False), \
        GradientStabilityPruning(include=["net.3"], schedule="one_shot", start_step=4, evaluate=False)
    _trainer([first, second], max_epochs=1, max_steps=6).fit(_mlp(), DigitsDataModule(batch_size=64))
    assert list(first.masks) == ["net.1.weight"] and list(second.masks) == ["net.3.weight"]
