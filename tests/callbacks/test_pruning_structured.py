"""Structured pruning through the callback on a stock ``nn.TransformerEncoder`` (fx cannot trace inside it):
attention heads and FFN neurons found in ``setup``, removed at the end, MACs reported, the result reloads."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization, load_compressed
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.reporting.summary import summarize
from lightning_compress.structure.attention import PrunedMultiheadAttention
from tests.helpers import quiet_trainer, report_of


class RowTransformer(pl.LightningModule):
    """An 8x8 digit read as 8 tokens of 8 pixels, a 2-layer encoder with 4 heads, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.view(x.shape[0], 8, 8))).mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _pruning(**kwargs) -> GradientStabilityPruning:
    return GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, scope="layer", schedule="one_shot",
                                    start_step=40, **kwargs)


class _GroupsAtFitStart(pl.Callback):
    """Records, before any training step, which layers the pruning callback already knows it can prune."""

    def __init__(self, pruning: GradientStabilityPruning) -> None:
        self.pruning, self.prunable = pruning, None

    def on_fit_start(self, trainer, pl_module):
        groups = self.pruning.state.groups or {}
        self.prunable = sorted(name for name, group in groups.items() if group.prunable)


def test_heads_and_ffn_neurons_are_found_in_setup_and_removed(capfd: pytest.CaptureFixture) -> None:
    pl.seed_everything(0)
    model, pruning = RowTransformer(), _pruning()
    probe = _GroupsAtFitStart(pruning)
    quiet_trainer([pruning, probe], max_epochs=3).fit(model, DigitsDataModule(batch_size=64))
    assert "encoder.layers.0.self_attn" in probe.prunable and "encoder.layers.1.linear1" in probe.prunable
    assert "which layers can lose units" in capfd.readouterr().err
    attention = model.encoder.layers[0].self_attn
    assert isinstance(attention, PrunedMultiheadAttention) and attention.num_heads < 4
    assert model.encoder.layers[0].linear1.out_features < 64
    report = pruning.report
    assert report.macs_after is not None and report.macs_after < report.macs_before
    reloaded = load_compressed(RowTransformer(), report.files["compacted"])
    x = torch.rand(5, 1, 8, 8)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))


def test_a_macs_target_runs_and_removes_compute() -> None:
    pl.seed_everything(0)
    model, pruning = RowTransformer(), _pruning(structured_target="macs")
    trainer = quiet_trainer([pruning], max_epochs=3)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    report = report_of(trainer)
    assert report.macs_after < 0.75 * report.macs_before
    assert report.settings["pruning"]["structured_target"] == "macs"


def test_a_macs_target_needs_structured_pruning() -> None:
    with pytest.raises(ValueError, match=r"`structured_target`='macs'.*needs structured=True"):
        GradientStabilityPruning(structured_target="macs")
    with pytest.raises(ValueError, match=r"`structured_target` must be one of"):
        PruningConfig(structured=True, structured_target="flops")


def test_planner_settings_are_arguments_and_bad_values_are_refused() -> None:
    pruning = GradientStabilityPruning(structured=True, normalize="median", round_to=8, macs_exponent=0.25,
                                       structured_target="macs")
    assert (pruning.config.normalize, pruning.config.round_to, pruning.config.macs_exponent) == ("median", 8, 0.25)
    assert pruning.settings()["round_to"] == 8
    with pytest.raises(ValueError, match=r"`normalize` must be one of \['mean', 'median', 'none'\], got 'max'"):
        GradientStabilityPruning(structured=True, normalize="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`round_to` must be an integer in \[1, inf\], got 0"):
        GradientStabilityPruning(structured=True, round_to=0)
    with pytest.raises(TypeError, match=r"`round_to` must be an integer, got 8.0"):
        GradientStabilityPruning(structured=True, round_to=8.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`macs_exponent` must be a number in \[0, 1\], got 1.5"):
        GradientStabilityPruning(structured=True, structured_target="macs", macs_exponent=1.5)


def test_without_an_example_input_the_first_batch_is_used() -> None:
    pl.seed_everything(0)
    model, pruning = RowTransformer(), _pruning()
    model.example_input_array = None
    quiet_trainer([pruning], max_epochs=3).fit(model, DigitsDataModule(batch_size=64))
    assert isinstance(model.encoder.layers[1].self_attn, PrunedMultiheadAttention)


class _ConvBN(pl.LightningModule):
    """A conv + BatchNorm digit classifier (8x8 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x.view(-1, 1, 8, 8)))).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("eval_mode", [True, False])
def test_batchnorm_left_in_eval_mode_is_warned_about(eval_mode: bool) -> None:
    """Lightning's fit does not call ``train()``: a model left in eval mode (an accuracy check before the fit)
    fine-tunes with its BatchNorm statistics frozen at the unpruned model's, which threw a pruned ResNet to chance."""
    pl.seed_everything(0)
    model = _ConvBN()
    model.train(not eval_mode)
    pruning = GradientStabilityPruning(sparsity=0.25, structured=True, schedule="one_shot", start_step=2,
                                       evaluate=False, verbose=0, exclude=[r"^head$"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer([pruning], max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(
            model, DigitsDataModule(batch_size=32))
    frozen = [w for w in caught if "BatchNorm layer(s) are in eval mode" in str(w.message)]
    assert len(frozen) == (1 if eval_mode else 0)
    if eval_mode:
        assert "bn" in str(frozen[0].message)


class _PooledMLP(MLPClassifier):
    """An MLP with a pooler that runs but feeds nothing the model returns (as BERT's, in a mean-pooled model)."""

    def __init__(self) -> None:
        super().__init__(input_size=64, hidden=[64, 32])
        self.pooler = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.net[:3](x)
        self.pooler(hidden)
        return self.net[3:](hidden)


def test_an_unused_layer_is_reported_as_dead_code_with_no_negative_bytes() -> None:
    pl.seed_everything(0)
    model = _PooledMLP()
    pruning = GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, start_step=5, end_step=30,
                                       frequency=5, evaluate=False)
    quantization = PostTrainingQuantization(bits=8)
    trainer = quiet_trainer([pruning, quantization], max_epochs=2)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    assert model.pooler.out_features == 64  # its units were not "pruned" (its gradient is zero: all would go)
    rows = summarize(report_of(trainer), model)["layers"]
    assert "dead code" in rows["pooler"]["note"]
    assert all(row["bytes_compressed"] > 0 and row["ratio"] > 0 for row in rows.values()), rows
    # a compacted, quantized layer: its codes and scales plus its bias as compacted (not minus the dense bias)
    assert model.net[1].out_features < 64
    for name in ("net.1", "net.3"):
        module = model.get_submodule(name)
        assert rows[name]["bytes_compressed"] == quantization.result.layers[name].nbytes() + 4 * module.out_features
