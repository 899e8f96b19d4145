"""PostTrainingQuantization in real ``Trainer.fit`` runs on scikit-learn's digits."""

import copy
import hashlib
import inspect
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import Logger
from safetensors.torch import load_file
from torchmetrics.classification import MulticlassAccuracy

import lightning_compress.callbacks.quantization as quantization_module
from lightning_compress.callbacks.base import CompressionCallback, ModelNotFiniteError
from lightning_compress.callbacks.quantization import PostTrainingQuantization
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.quantization import load_quantized, quantize
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.export import read_metadata
from tests.helpers import report_of as report_for


def _model():
    return MLPClassifier(input_size=64, hidden=[64, 32], lr=1e-2)


def _fit(callbacks, root, model=None, epochs=5, **trainer_kwargs):
    """A short real fit; ``root`` receives the compression report files."""
    pl.seed_everything(0)
    model = model or _model()
    kwargs = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
    }
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return trainer, model


@torch.no_grad()
def _val_accuracy(model):
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    metric = MulticlassAccuracy(num_classes=10)
    model.eval()
    for x, y in dm.val_dataloader():
        metric.update(model(x), y)
    return metric.compute().item()


class _Capture(Logger):
    name, version = "capture", 0

    def __init__(self):
        super().__init__()
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, *args, **kwargs):
        pass


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 1}, ValueError, r"`bits` must be an integer in \[2, 8\], got 1"),
        ({"granularity": "per_row"}, ValueError, r"`granularity` must be one of .* got 'per_row'"),
        ({"group_size": -1}, ValueError, r"`group_size` must be an integer in \[1, inf\], got -1"),
        ({"symmetric": 1}, TypeError, r"`symmetric` must be True or False, got 1"),
        ({"calibration": "kl"}, ValueError, r"`calibration` must be one of \['minmax', 'mse', 'percentile'\]"),
        ({"percentile": 100.5}, ValueError, r"`percentile` must be a number in \(50, 100\], got 100.5"),
        ({"mse_grid": 0}, ValueError, r"`mse_grid` must be an integer in \[2, 1000\], got 0"),
        ({"scale_dtype": "int8"}, ValueError, r"`scale_dtype` must be one of \['float16', 'float32'\], got 'int8'"),
        ({"module_types": []}, ValueError, r"`module_types` must be a non-empty list of type names, got \[\]"),
        ({"module_types": ["Dense"]}, ValueError, r"`module_types` entry 'Dense' is not a known module type"),
        ({"include": ["("]}, ValueError, r"`include` entry '\(' is not a valid regular expression"),
        ({"exclude": ["["]}, ValueError, r"`exclude` entry '\[' is not a valid regular expression"),
        ({"bits_overrides": {"net": 12}}, ValueError, r"`bits_overrides\['net'\]` must be an integer in \[2, 8\]"),
        ({"metric": "torchmetrics.Nope"}, ValueError, r"`metric` must be the class path of a torchmetrics Metric"),
        ({"metric_kwargs": {"bogus": 1}}, ValueError, r"`metric_kwargs`.*bogus"),
        ({"max_metric_drop": -0.1}, ValueError, r"`max_metric_drop` must be a number in \[0, inf\], got -0.1"),
        ({"max_metric_drop": "1%"}, TypeError, r"`max_metric_drop` must be a number, got '1%'"),
        ({"fallback": "skip"}, ValueError, r"`fallback` must be one of \['float', 'more_bits'\], got 'skip'"),
        ({"export_path": "model.pt"}, ValueError, r"`export_path` must be None or a path ending in '.safetensors'"),
        ({"save_float_copy": "yes"}, TypeError, r"`save_float_copy` must be True or False, got 'yes'"),
    ],
)
def test_constructor_validates_every_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        PostTrainingQuantization(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "match"),
    [
        ({"module_types": ["Conv2d"]}, {}, r"nothing to quantize in MLPClassifier: .*`module_types`=\['Conv2d'\]"),
        (
            {"granularity": "per_group"},
            {},
            r"layer 'net.1' \(Linear\): `group_size`=128 does not divide the input size 64.*\[64, 32, 16, 8\]",
        ),
        ({"max_metric_drop": 0.01}, {"limit_val_batches": 0}, r"`max_metric_drop`=0.01 needs validation data"),
        (
            {"export_path": "/proc/nope/m.safetensors"},
            {},
            r"`export_path`='/proc/nope/m.safetensors'.*cannot be created",
        ),
    ],
)
def test_setup_refuses_before_training(tmp_path, kwargs, trainer_kwargs, match):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        _fit([PostTrainingQuantization(**kwargs)], tmp_path, model=model, **trainer_kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any step


def test_fit_quantizes_exports_and_keeps_the_float_weights(tmp_path):
    export = tmp_path / "digits.safetensors"
    logger = _Capture()
    callback = PostTrainingQuantization(bits=8, export_path=str(export))
    trainer, model = _fit([callback], tmp_path, logger=logger)
    rec = report_for(trainer)
    assert rec.metric_before > 0.85 and rec.metric_before - rec.metric_after <= 0.01
    assert rec.metric_after == pytest.approx(_val_accuracy(model))
    assert rec.files["quantized"] == str(export)
    assert rec.files["float_copy"] == str(tmp_path / "digits.fp32.safetensors")
    assert set(rec.layers) == {"net.1", "net.3", "net.5"}
    for layer in rec.layers.values():  # int8 codes + a float scale per row + the float bias
        assert layer.bits == 8 and layer.bytes_compressed < 0.35 * layer.bytes_fp32
    assert sum(r.bytes_compressed for r in rec.layers.values()) < 0.3 * sum(r.bytes_fp32 for r in rec.layers.values())
    assert rec.events[-1].kind == "quantize" and rec.events[-1].accepted
    assert any("quantization/metric_after" in metrics for metrics, _ in logger.metrics)
    # the way back: the float copy holds the trained float weights, also kept on the callback
    floats = load_file(tmp_path / "digits.fp32.safetensors")
    for name in ("net.1", "net.3", "net.5"):
        assert torch.equal(floats[f"{name}.weight"], callback.float_weights[name])
        assert not torch.equal(floats[f"{name}.weight"], model.get_submodule(name).weight)
    # the export reloads into a fresh model with identical outputs
    fresh = load_quantized(_model(), export).eval()
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(fresh(x), model.eval()(x))
    callback.restore_float(model)
    assert torch.equal(model.net[1].weight, floats["net.1.weight"])


def test_accuracy_aware_fallback_restores_the_sensitive_layer_to_float(tmp_path):
    bound = 0.005
    callback = PostTrainingQuantization(
        bits=8, granularity="per_tensor", bits_overrides={r"net\.1$": 2}, max_metric_drop=bound
    )
    trainer, model = _fit([callback], tmp_path)
    rec = report_for(trainer)
    assert rec.events[0].accepted is False and rec.metric_before - rec.events[0].metric_after > bound
    assert [f["layer"] for f in rec.fallbacks] == ["net.1"]
    assert rec.fallbacks[0]["from_bits"] == 2 and rec.fallbacks[0]["to_bits"] == 32
    assert rec.fallbacks[0]["sensitivity"] > bound
    assert torch.equal(model.net[1].weight, callback.float_weights["net.1"].to(model.net[1].weight))
    assert callback.bits_used == {"net.1": 32, "net.3": 8, "net.5": 8}
    assert rec.layers["net.1"].bits == 32 and rec.layers["net.3"].bits == 8
    assert rec.metric_before - _val_accuracy(model) <= bound  # the bound holds, measured independently


def test_more_bits_fallback_climbs_the_even_widths_to_8_bits(tmp_path):
    callback = PostTrainingQuantization(
        bits=2, granularity="per_tensor", include=[r"net\.1$"], max_metric_drop=0.005, fallback="more_bits"
    )
    trainer, model = _fit([callback], tmp_path)
    rec = report_for(trainer)
    steps = [(f["layer"], f["from_bits"], f["to_bits"]) for f in rec.fallbacks]
    ladder = [2, 4, 6, 8, 32]
    assert steps and steps == [("net.1", a, b) for a, b in zip(ladder, ladder[1:])][: len(steps)]
    final = steps[-1][2]
    assert callback.bits_used == {"net.1": final} and final <= 8, "int8 per-tensor is within half a point here"
    assert len(torch.unique(model.net[1].weight)) <= 2**final  # the int grid of the final width, not float
    assert rec.metric_before - _val_accuracy(model) <= 0.005
    assert f"1x int{final}" in rec.events[-1].note and "1x int2" in rec.events[0].note


class _Finalizer(CompressionCallback):
    """Stands in for the pruning callback (a compression callback that finishes first): zeroes half of net.1."""

    finish_order = 0
    report_name = "finalizer"

    def __init__(self):
        super().__init__()
        self.calls = []

    def setup(self, trainer, pl_module, stage):
        self._setup_fit(trainer, pl_module, needs_metric=False)

    def _finish(self, trainer, pl_module):
        weight = pl_module.net[1].weight
        self.calls.append(len(torch.unique(weight)))  # float (many values) or already quantized (<= 256)?
        with torch.no_grad():
            weight[:, ::2] = 0.0


def test_other_callbacks_are_finalized_first_and_zeros_survive(tmp_path):
    finalizer = _Finalizer()
    trainer, model = _fit(
        [PostTrainingQuantization(bits=4), finalizer], tmp_path
    )  # listed after: still finalized first
    assert len(finalizer.calls) == 1 and finalizer.calls[0] > 256
    assert bool((model.net[1].weight[:, ::2] == 0).all())
    record = report_for(trainer).layers["net.1"]
    assert record.sparsity == 0.0  # no pruning callback ran: nothing is reported as pruned
    assert record.zeros_after_rounding >= 0.5  # the zeros are counted apart from pruning


def test_with_the_pruning_callback_pruned_weights_stay_pruned(tmp_path):
    from lightning_compress.callbacks.pruning import GradientStabilityPruning

    quantization = PostTrainingQuantization(bits=4)
    trainer, model = _fit([quantization, GradientStabilityPruning(sparsity=0.5)], tmp_path)
    for name, before in quantization.float_weights.items():
        assert (before == 0).float().mean() > 0.25  # pruning was finalized before the float copy was taken
        assert bool((model.get_submodule(name).weight[before == 0] == 0).all())
    assert {e.kind for e in report_for(trainer).events} == {"prune", "quantize"}


class _RankHash(Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for key, value in sorted(pl_module.state_dict().items()):
            digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
        Path(self.folder, f"rank{trainer.global_rank}.txt").write_text(digest.hexdigest())


@pytest.mark.ddp
@pytest.mark.parametrize(("method", "bits", "bound"), [
    ("rtn", 4, 0.5),
    ("gptq", 4, 0.5),  # every rank calibrates on rank zero's batches
    ("gptq", 2, 0.0),  # ... and falls back along GPTQ rungs made from the kept Hessians, the same on every rank
])
def test_ddp_ranks_quantize_identically_and_rank_zero_exports(tmp_path, method, bits, bound):
    out = tmp_path / "out"
    out.mkdir()
    export = out / "ddp.safetensors"
    gptq = {"calibration_batches": 4} if method == "gptq" else {}  # refused with "rtn": it would do nothing
    quantization = PostTrainingQuantization(bits=bits, max_metric_drop=bound, export_path=str(export),
                                            method=method, **gptq)
    callbacks = [quantization, _RankHash(out)]
    _fit(callbacks, tmp_path, epochs=2, strategy="ddp_spawn", devices=2)
    assert (out / "rank0.txt").read_text() == (out / "rank1.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "ddp.fp32.safetensors",
        "ddp.safetensors",
        "rank0.txt",
        "rank1.txt",
    ]
    if bits == 2:  # the callback object stays in the spawned processes: the export says what was kept
        layers = read_metadata(export)["layers"]
        at_two = [key for key, layer in layers.items() if layer["bits"] == 2]
        assert len(at_two) < 3, f"a zero bound should have promoted a layer of the three: {layers}"
        return
    weight = load_quantized(_model(), export).net[3].weight
    assert max(len(torch.unique(row)) for row in weight) <= 16  # 4-bit codes, one scale per row


def _output_error(model, reference_state) -> float:
    """Mean squared difference of the logits on the validation data, quantized vs float."""
    reference = _model()
    reference.load_state_dict(reference_state)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    model.eval()
    reference.eval()
    with torch.no_grad():
        return sum(float((model(x) - reference(x)).square().mean()) for x, _ in dm.val_dataloader())


def test_gptq_from_the_training_data_beats_round_to_nearest(tmp_path):
    errors = {}
    for method in ("rtn", "gptq"):
        gptq = {"calibration_batches": 8} if method == "gptq" else {}
        callback = PostTrainingQuantization(bits=3, granularity="per_channel", method=method, **gptq)
        trainer, model = _fit([callback], tmp_path / method, epochs=3)
        callback.restore_float(model)
        float_state = {k: v.clone() for k, v in model.state_dict().items()}
        for name, layer in callback.result.layers.items():  # back to the quantized weights
            model.get_submodule(name).weight.data.copy_(layer.qtensor.dequantize())
        errors[method] = _output_error(model, float_state)
        assert {layer.method for layer in callback.result.layers.values()} == {method}
        assert report_for(trainer).settings["quantization"]["method"] == method
    assert errors["gptq"] < errors["rtn"], errors


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_gptq_shows_a_progress_bar_per_layer_in_the_trainers_style(tmp_path, capsys, monkeypatch, bar):
    callback = PostTrainingQuantization(bits=4, method="gptq", calibration_batches=2)
    progress = TQDMProgressBar() if bar == "tqdm" else RichProgressBar()
    calls = []
    original = quantization_module.gptq_layers

    def spy(*args, **kwargs):  # what the bar is told, whatever the terminal shows
        hook = kwargs["progress"]
        kwargs["progress"] = lambda done, total, name: (calls.append((done, total)), hook(done, total, name))
        return original(*args, **kwargs)

    monkeypatch.setattr(quantization_module, "gptq_layers", spy)
    _fit([callback, progress], tmp_path, epochs=1, enable_progress_bar=True)
    n = len(callback.result.layers)
    assert calls == [(i, n) for i in range(1, n + 1)]
    if bar == "tqdm":
        assert f"GPTQ:   0%|          | 0/{n} " in capsys.readouterr().err  # drawn (then updated every 0.1 s)


# ---------------------------------------------------------------------------- issue 19 / 20: carried codes, late errors
def test_the_fitted_model_carries_its_codes_and_restore_float_forgets_them(tmp_path):
    callback = PostTrainingQuantization(bits=4)
    _, model = _fit([callback], tmp_path, epochs=1)
    record = carried(model)
    assert record is not None and record.source == "PostTrainingQuantization"
    assert set(record.codes) == {f"{name}.weight" for name in callback.result.layers}
    assert all(record.codes[layer.key] is layer.qtensor for layer in callback.result.layers.values())
    assert record.stale(model) == []
    callback.restore_float(model)
    assert carried(model) is None


def test_a_layer_sent_back_to_float_leaves_the_carried_codes(tmp_path):
    callback = PostTrainingQuantization(bits=8, granularity="per_tensor", bits_overrides={r"net\.1$": 2},
                                        max_metric_drop=0.005, fallback="float")
    _, model = _fit([callback], tmp_path)
    assert callback.bits_used["net.1"] == 32 and callback.result.bound_met is True
    assert set(carried(model).codes) == {"net.3.weight", "net.5.weight"} and carried(model).stale(model) == []


class _Poison(Callback):
    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.net[3].weight[0, 0] = float("nan")


def test_non_finite_weights_at_the_end_of_the_fit_raise_and_write_nothing(tmp_path):
    export = tmp_path / "nan.safetensors"
    with pytest.raises(ModelNotFiniteError, match=r"the model's weights are not finite before quantization: "
                                                  r"net\.3\.weight; the fit diverged .* nothing was quantized"):
        _fit([_Poison(), PostTrainingQuantization(bits=8, export_path=str(export))], tmp_path, epochs=1)
    assert not export.exists() and not (tmp_path / "nan.fp32.safetensors").exists()


def test_an_error_while_quantizing_puts_the_float_weights_back(tmp_path, monkeypatch):
    callback = PostTrainingQuantization(bits=4, max_metric_drop=0.01)
    calls = []

    def failing_evaluate(trainer, pl_module):  # the float model measures; the quantized one raises
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("evaluation failed")
        return 0.9

    monkeypatch.setattr(callback, "_evaluate", failing_evaluate)
    model = _model()
    with pytest.raises(RuntimeError, match="evaluation failed"):
        _fit([callback], tmp_path, model=model, epochs=1)
    for name, weight in callback.float_weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight)
    assert carried(model) is None


class _DictTraining(MLPClassifier):
    """Trains on dict batches while validation batches are tuples: the calibration path reads the training data."""

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["x"], batch["y"]), batch_idx)


class _Dicts:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return ({"x": x, "y": y} for x, y in self.loader)

    def __len__(self):
        return len(self.loader)


class _DictTrainData(DigitsDataModule):
    def train_dataloader(self):
        return _Dicts(super().train_dataloader())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_gptq_dry_runs_a_training_batch_in_setup(tmp_path, method):
    model = _DictTraining(input_size=64, hidden=[64, 32], lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(callbacks=[PostTrainingQuantization(bits=4, method=method)], max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    if method == "rtn":  # the layout trains and quantizes: only GPTQ's calibration reads training batches
        trainer.fit(model, _DictTrainData(batch_size=64))
        assert trainer.global_step > 0
        return
    with pytest.raises(ValueError, match=r"the training data batch 0 \(tensors shaped \[\(64, 1, 8, 8\), \(64,\)\]\) "
                                         r"does not run through the model with PostTrainingQuantization's GPTQ "
                                         r"calibration .*compression_step"):
        trainer.fit(model, _DictTrainData(batch_size=64))
    assert trainer.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_group_size_misfits_are_all_named_in_setup_with_sizes_that_fit(tmp_path):
    model = MLPClassifier(input_size=64, hidden=[48, 32], lr=1e-2)
    with pytest.raises(ValueError, match=r"layer 'net.3' \(Linear\): `group_size`=64 does not divide the input size "
                                         r"48, allowed e.g. \[48, 24, 16, 12\]; layer 'net.5' .* input size 32.*"
                                         r"divide every selected layer's input size: \[16, 8, 4, 2\]"):
        _fit([PostTrainingQuantization(bits=4, granularity="per_group", group_size=64)], tmp_path, model=model)


class _Compactor(CompressionCallback):
    """Stands in for structured compaction at the end of the fit: net.1 keeps 48 of its 64 units, net.3 24 of 32."""

    finish_order = 0
    report_name = "compactor"

    def setup(self, trainer, pl_module, stage):
        self._setup_fit(trainer, pl_module, needs_metric=False)

    def _finish(self, trainer, pl_module):
        net = pl_module.net
        new = {1: torch.nn.Linear(64, 48), 3: torch.nn.Linear(48, 24), 5: torch.nn.Linear(24, net[5].out_features)}
        with torch.no_grad():
            for index, layer in new.items():
                layer.weight.copy_(net[index].weight[: layer.out_features, : layer.in_features])
                layer.bias.copy_(net[index].bias[: layer.out_features])
        for index, layer in new.items():
            net[index] = layer


def test_a_width_that_no_longer_fits_the_group_is_quantized_per_channel_with_a_warning(tmp_path):
    callback = PostTrainingQuantization(bits=4, granularity="per_group", group_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model = _fit([callback, _Compactor()], tmp_path, epochs=1)
    said = [str(w.message) for w in caught if "no longer divides" in str(w.message)]
    assert len(said) == 1, said  # once, naming both layers
    assert "net.3: per_channel: `group_size`=32 no longer divides its input size 48" in said[0]
    assert "net.5: per_channel: `group_size`=32 no longer divides its input size 24" in said[0]
    granularity = {name: layer.qtensor.spec.granularity for name, layer in callback.result.layers.items()}
    assert granularity == {"net.1": "per_group", "net.3": "per_channel", "net.5": "per_channel"}
    assert "no longer divides" in callback.result.notes["net.3"]
    assert "no longer divides" in report_for(trainer).layers["net.3"].note
    assert carried(model).stale(model) == []


# ---------------------------------------------------------------------------- one set of defaults (issue 20, item 3)
def test_every_shared_default_of_the_callback_equals_quantizes():
    callback = inspect.signature(PostTrainingQuantization.__init__).parameters
    function = inspect.signature(quantize).parameters
    shared = sorted(set(callback) & set(function) - {"self"})
    assert {"bits", "module_types", "embedding_bits", "fallback", "calibration_batches", "method"} <= set(shared)
    assert {name: callback[name].default for name in shared} == {name: function[name].default for name in shared}


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config)


class _EncoderClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 32)
        layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, input_ids):
        return self.head(self.encoder(self.embed(input_ids)).mean(1))


@pytest.mark.parametrize("make", [_bert, _EncoderClassifier], ids=["bert", "transformer_encoder"])
@pytest.mark.parametrize("kwargs", [{}, {"bits": 4, "granularity": "per_group", "group_size": 16}])
def test_the_callback_and_quantize_select_the_same_layers_at_the_same_bits(make, kwargs):
    model = make()
    planned = PostTrainingQuantization(**kwargs)._plan(model)
    result = quantize(copy.deepcopy(model), **kwargs)
    assert {n: s.bits for n, s in planned.specs.items()} == {n: layer.bits for n, layer in result.layers.items()}
    types = {type(model.get_submodule(name)).__name__ for name in result.layers}
    assert {"Embedding", "Linear"} <= types
    embeddings = [n for n in result.layers if isinstance(model.get_submodule(n), torch.nn.Embedding)]
    assert embeddings and all(result.layers[n].bits == 8 for n in embeddings)
    if make is _EncoderClassifier:
        assert "MultiheadAttention" in types  # the fused q/k/v in-proj, by both


class _TokenClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = _EncoderClassifier()

    def forward(self, input_ids):
        return self.model(input_ids)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return torch.nn.functional.cross_entropy(self(ids), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):  # random token ids: a shape test, not an accuracy one
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randint(0, 100, (32, 12), generator=g),
                                              torch.randint(0, 5, (32,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=8)


def test_a_fit_exports_the_embedding_at_8_bits_and_the_attention_in_proj_by_default(tmp_path):
    export = tmp_path / "tokens.safetensors"
    module = _TokenClassifier()
    pl.Trainer(callbacks=[PostTrainingQuantization(bits=4, export_path=str(export))], max_epochs=1, logger=False,
               enable_progress_bar=False, enable_checkpointing=False, default_root_dir=str(tmp_path)).fit(module)
    layers = read_metadata(export)["layers"]
    bits = {key: layer["bits"] for key, layer in layers.items()}
    assert bits["model.embed.weight"] == 8
    assert bits["model.encoder.layers.0.self_attn.in_proj_weight"] == 4
    assert carried(module).stale(module) == []
