"""Bad inputs, table-driven (issue 13), part 2: what only the fit's ``setup`` can see, the loaders / savers' arguments,
and the CLI. Each case asserts the error type and that the message names the argument and the value; fit and CLI
cases also assert that no optimizer step ran and no weight changed (or that nothing was written)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization, load_compacted, quantize
from lightning_compress.cli import main
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.quantization.export import (
    check_same_run,
    load_float,
    load_quantized,
    read_metadata,
    save_float,
    save_quantized,
)
from tests.helpers import quiet_trainer

MSE = "torchmetrics.regression.MeanSquaredError"
OWNED_ELSEWHERE = "TEMPORARY (file owned by another engineer): "


class _DictDigits(DigitsDataModule):
    """Validation batches are dicts ``{"x", "y"}``: the callbacks cannot read them without ``compression_step``."""

    def val_dataloader(self) -> DataLoader:
        def collate(items: list) -> dict[str, torch.Tensor]:
            return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}

        return DataLoader(self._splits["val"], batch_size=self.batch_size, collate_fn=collate)


class _DictMLP(MLPClassifier):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step((batch["x"], batch["y"]), batch_idx)


# id, callback factory (gets tmp_path), data, trainer kwargs, error, texts in the message, xfail reason ("" = none)
FitCase = tuple[str, Callable[[Path], Any], type, dict[str, Any], type[Exception], tuple[str, ...], str]
FIT: list[FitCase] = [
    ("pruning_dict_batches", lambda _: GradientStabilityPruning(), _DictDigits, {}, ValueError,
     ("GradientStabilityPruning", "dict", "compression_step"), ""),
    ("quantization_dict_batches", lambda _: PostTrainingQuantization(), _DictDigits, {}, ValueError,
     ("PostTrainingQuantization", "dict", "compression_step"), ""),
    ("pruning_num_classes_3", lambda _: GradientStabilityPruning(metric_kwargs={"num_classes": 3}), DigitsDataModule,
     {}, ValueError, ("metric_kwargs", "'num_classes': 3"), ""),
    ("quantization_num_classes_3", lambda _: PostTrainingQuantization(metric_kwargs={"num_classes": 3}),
     DigitsDataModule, {}, ValueError, ("metric_kwargs", "'num_classes': 3"), ""),
    ("pruning_regression_metric", lambda _: GradientStabilityPruning(metric=MSE), DigitsDataModule, {}, ValueError,
     ("metric", MSE), ""),
    ("quantization_regression_metric", lambda _: PostTrainingQuantization(metric=MSE), DigitsDataModule, {},
     ValueError, ("metric", MSE), ""),
    ("export_path_is_a_directory", lambda p: PostTrainingQuantization(export_path=str(p / "dir.safetensors")),
     DigitsDataModule, {}, ValueError, ("export_path", "dir.safetensors", "directory"), ""),
    ("export_path_existing_file", lambda p: PostTrainingQuantization(export_path=str(p / "old.safetensors")),
     DigitsDataModule, {}, ValueError, ("export_path", "old.safetensors", "already exists"), ""),
    ("export_path_cannot_be_created", lambda _: PostTrainingQuantization(export_path="/proc/nope/x.safetensors"),
     DigitsDataModule, {}, ValueError, ("export_path", "/proc/nope/x.safetensors"), ""),
    ("pruning_include_matches_nothing", lambda _: GradientStabilityPruning(include=["nomatch"]), DigitsDataModule,
     {}, ValueError, ("include", "nomatch"), ""),
    ("quantization_include_matches_nothing", lambda _: PostTrainingQuantization(include=["nomatch"]),
     DigitsDataModule, {}, ValueError, ("include", "nomatch"), ""),
    ("pruning_exclude_matches_nothing", lambda _: GradientStabilityPruning(exclude=["net.9"]), DigitsDataModule, {},
     ValueError, ("exclude", "net.9", "re.search"), ""),
    ("quantization_bits_overrides_match_nothing", lambda _: PostTrainingQuantization(bits_overrides={"fc9": 4}),
     DigitsDataModule, {}, ValueError, ("bits_overrides", "fc9"), ""),
    ("group_size_not_dividing", lambda _: PostTrainingQuantization(granularity="per_group", group_size=7),
     DigitsDataModule, {}, ValueError, ("group_size", "7"), ""),
    ("pruning_bound_without_validation", lambda _: GradientStabilityPruning(max_metric_drop=0.01), DigitsDataModule,
     {"limit_val_batches": 0}, ValueError, ("max_metric_drop", "0.01"), ""),
    ("quantization_bound_without_validation", lambda _: PostTrainingQuantization(max_metric_drop=0.02),
     DigitsDataModule, {"limit_val_batches": 0}, ValueError, ("max_metric_drop", "0.02"), ""),
    # arguments that would silently do nothing (issue 19, cluster 7)
    ("pruning_round_to_above_every_layer", lambda _: GradientStabilityPruning(structured=True, round_to=16),
     DigitsDataModule, {}, ValueError, ("`round_to`=16", "'net.1': 16"), ""),
    ("two_pruning_callbacks_same_layers", lambda _: [GradientStabilityPruning(), GradientStabilityPruning(0.5)],
     DigitsDataModule, {}, ValueError, ("two GradientStabilityPruning", "'net.1'", "sparsity=0.8", "sparsity=0.5"),
     ""),
    ("pruning_round_to_off_the_quantizers_grid", lambda _: [
        GradientStabilityPruning(structured=True, compact=True, round_to=12),
        PostTrainingQuantization(bits=4, granularity="per_group", group_size=16)], DigitsDataModule, {}, ValueError,
     ("`round_to`=12", "group_size=16"), ""),
    ("pruning_thresholds_on_the_quantizers_grid", lambda _: [
        GradientStabilityPruning(sparsity=None, mean_threshold=0.1, std_threshold=0.1, structured=True, compact=True),
        PostTrainingQuantization(bits=4, granularity="per_group", group_size=16)], DigitsDataModule, {}, ValueError,
     ("`sparsity`=None", "group_size=16", "compact=True"), ""),
    ("pruning_limit_train_batches_0", lambda _: GradientStabilityPruning(), DigitsDataModule,
     {"limit_train_batches": 0}, ValueError, ("limit_train_batches", "0", "GradientStabilityPruning"), ""),
    ("pruning_max_steps_0", lambda _: GradientStabilityPruning(), DigitsDataModule, {"max_steps": 0}, ValueError,
     ("max_steps", "0", "GradientStabilityPruning"), ""),
]


def _fit_params() -> list[Any]:
    return [pytest.param(*c[1:6], id=c[0], marks=[pytest.mark.xfail(reason=OWNED_ELSEWHERE + c[6], strict=True)]
                         if c[6] else []) for c in FIT]


@pytest.mark.parametrize(("make", "data", "trainer_kwargs", "error", "texts"), _fit_params())
def test_setup_refuses_before_the_first_step(tmp_path: Path, make: Callable[[Path], Any], data: type,
                                             trainer_kwargs: dict[str, Any], error: type[Exception],
                                             texts: tuple[str, ...]) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "old.safetensors").write_bytes(b"a previous export")
    torch.manual_seed(0)
    model = (_DictMLP if data is _DictDigits else MLPClassifier)(input_size=64, hidden=[16])
    before = copy.deepcopy(model.state_dict())
    made = make(tmp_path)
    trainer = quiet_trainer(made if isinstance(made, list) else [made], **{"max_steps": 3, **trainer_kwargs})
    with pytest.raises(error) as info:
        trainer.fit(model, data(batch_size=64))
    for text in texts:
        assert text in str(info.value), f"{text!r} missing from: {info.value}"
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


IDLE: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [  # constructor arguments that would do nothing
    ("normalize_unstructured", {"normalize": "mean"}, ("`normalize`='mean'", "structured=True")),
    ("round_to_unstructured", {"round_to": 8}, ("`round_to`=8", "structured=True")),
    ("macs_exponent_units_target", {"structured": True, "macs_exponent": 0.25},
     ("`macs_exponent`=0.25", "structured_target='macs'")),
    ("round_to_with_thresholds", {"structured": True, "sparsity": None, "mean_threshold": 0.1, "std_threshold": 0.1,
                                  "round_to": 4}, ("`round_to`=4", "`sparsity` is None")),
]


@pytest.mark.parametrize(("kwargs", "texts"), [c[1:] for c in IDLE], ids=[c[0] for c in IDLE])
def test_an_argument_that_would_do_nothing_is_refused(kwargs: dict[str, Any], texts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as info:
        GradientStabilityPruning(**kwargs)
    for text in texts:
        assert text in str(info.value), f"{text!r} missing from: {info.value}"


# ---------------------------------------------------------------------------- loaders' and savers' arguments
def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


def _wider_input() -> nn.Module:
    return nn.Sequential(nn.Linear(9, 12), nn.ReLU(), nn.Linear(12, 4))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = _net()
    save_float(model, tmp_path / "m.fp32.safetensors", run_id="run-a")
    save_quantized(model, quantize(model), tmp_path / "m.safetensors", run_id="run-a")
    other = _net(1)
    save_float(other, tmp_path / "other.fp32.safetensors", run_id="run-b")
    (tmp_path / "text.safetensors").write_text("hello, not a safetensors file")
    (tmp_path / "folder.safetensors").mkdir()
    return {p.name: p for p in tmp_path.iterdir()} | {"missing.safetensors": tmp_path / "missing.safetensors"}


LoaderCase = tuple[str, Callable[[dict[str, Path]], Any], type[Exception], Callable[[dict[str, Path]], tuple[str, ...]]]
LOADERS: list[LoaderCase] = [
    ("quantized_missing", lambda f: load_quantized(_net(), f["missing.safetensors"]), FileNotFoundError,
     lambda f: (str(f["missing.safetensors"]),)),
    ("quantized_directory", lambda f: load_quantized(_net(), f["folder.safetensors"]), IsADirectoryError,
     lambda f: (str(f["folder.safetensors"]),)),
    ("quantized_given_the_float_copy", lambda f: load_quantized(_net(), f["m.fp32.safetensors"]), ValueError,
     lambda f: (str(f["m.fp32.safetensors"]), "not a lightning-compress quantized export")),
    ("quantized_into_another_model", lambda f: load_quantized(nn.Sequential(nn.Linear(8, 4)), f["m.safetensors"]),
     ValueError, lambda f: (str(f["m.safetensors"]), "key '2.bias'", "not in the model's state_dict")),
    ("quantized_into_other_shapes", lambda f: load_quantized(_wider_input(), f["m.safetensors"]), ValueError,
     lambda f: (str(f["m.safetensors"]), "key '0.weight'", "[12, 8]", "[12, 9]")),
    ("quantized_text_file", lambda f: load_quantized(_net(), f["text.safetensors"]), ValueError,
     lambda f: (str(f["text.safetensors"]), "header")),
    ("quantized_other_run", lambda f: load_quantized(_net(), f["m.safetensors"], expect_run="run-b"), ValueError,
     lambda f: (str(f["m.safetensors"]), "'run-a'", "'run-b'")),
    ("metadata_missing", lambda f: read_metadata(f["missing.safetensors"]), FileNotFoundError,
     lambda f: (str(f["missing.safetensors"]),)),
    ("metadata_text_file", lambda f: read_metadata(f["text.safetensors"]), ValueError,
     lambda f: (str(f["text.safetensors"]),)),
    ("float_given_the_export", lambda f: load_float(_net(), f["m.safetensors"]), ValueError,
     lambda f: (str(f["m.safetensors"]), "not a lightning-compress float copy")),
    ("float_other_run", lambda f: load_float(_net(), f["other.fp32.safetensors"], expect_run="run-a"), ValueError,
     lambda f: (str(f["other.fp32.safetensors"]), "'run-b'", "'run-a'")),
    ("float_into_another_model", lambda f: load_float(_net().append(nn.Linear(4, 2)), f["m.fp32.safetensors"]),
     ValueError, lambda f: (str(f["m.fp32.safetensors"]), "key '3.bias'", "is not in the file")),
    ("pair_of_two_runs", lambda f: check_same_run(f["m.safetensors"], f["other.fp32.safetensors"]), ValueError,
     lambda f: (str(f["m.safetensors"]), str(f["other.fp32.safetensors"]), "'run-a'", "'run-b'")),
    ("compacted_missing", lambda f: load_compacted(_net(), f["missing.safetensors"]), FileNotFoundError,
     lambda f: (str(f["missing.safetensors"]),)),
    ("compacted_given_the_export", lambda f: load_compacted(_net(), f["m.safetensors"]), ValueError,
     lambda f: (str(f["m.safetensors"]), "save_compacted")),
    ("compacted_text_file", lambda f: load_compacted(_net(), f["text.safetensors"]), ValueError,
     lambda f: (str(f["text.safetensors"]),)),
]


@pytest.mark.parametrize(("call", "error", "texts"), [c[1:] for c in LOADERS], ids=[c[0] for c in LOADERS])
def test_loader_refuses(files: dict[str, Path], call: Callable[[dict[str, Path]], Any], error: type[Exception],
                        texts: Callable[[dict[str, Path]], tuple[str, ...]]) -> None:
    with pytest.raises(error) as info:
        call(files)
    for text in texts(files):
        assert text in str(info.value), f"{text!r} missing from: {info.value}"


SAVERS: list[tuple[str, Callable[[], tuple[nn.Module, Any]], type[Exception], tuple[str, ...]]] = [
    ("result_of_another_architecture", lambda: (nn.Sequential(nn.Linear(8, 12)), quantize(_net())), ValueError,
     ("`result`", "'2.weight'")),
    ("result_of_another_instance", lambda: (_net(1), quantize(_net())), ValueError,
     ("`result`", "'0'", "dequantized codes")),
    ("result_of_a_wider_model", lambda: (nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 4)),
                                         quantize(_net())), ValueError, ("`result`", "(12, 8)", "(24, 8)")),
    ("result_not_a_result", lambda: (_net(), {"0": "nope"}), TypeError, ("`result`", "dict")),
]


@pytest.mark.parametrize(("make", "error", "texts"), [c[1:] for c in SAVERS], ids=[c[0] for c in SAVERS])
def test_save_quantized_refuses_a_result_of_another_model(tmp_path: Path, make: Callable[[], Any],
                                                          error: type[Exception], texts: tuple[str, ...]) -> None:
    model, result = make()
    with pytest.raises(error) as info:
        save_quantized(model, result, tmp_path / "m.safetensors")
    for text in texts:
        assert text in str(info.value), f"{text!r} missing from: {info.value}"
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file


# ---------------------------------------------------------------------------- the CLI
_BASE = ["fit", "--model=MLPClassifier", "--model.input_size=64", "--model.hidden=[16]", "--data=DigitsDataModule",
         "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
_Q = "--trainer.callbacks+=PostTrainingQuantization"
_P = "--trainer.callbacks+=GradientStabilityPruning"
CLI: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("bits_nine", [_Q, "--trainer.callbacks.bits=9"], ("`bits`", "9")),
    ("export_path_directory", [_Q, "--trainer.callbacks.export_path={tmp}/dir.safetensors"],
     ("`export_path`", "dir.safetensors", "existing directory")),
    ("export_path_proc", [_Q, "--trainer.callbacks.export_path=/proc/nope/x.safetensors"],
     ("`export_path`", "/proc/nope/x.safetensors", "cannot be created")),
    ("export_path_suffix", [_Q, "--trainer.callbacks.export_path={tmp}/model.pt"], ("`export_path`", "model.pt")),
    ("export_path_existing_file", [_Q, "--trainer.callbacks.export_path={tmp}/old.safetensors"],
     ("`export_path`", "old.safetensors", "already exists")),
    ("include_string", [_P, "--trainer.callbacks.include=net.1"], ("include", "net.1")),
    ("sparsity_above_one", [_P, "--trainer.callbacks.sparsity=1.5"], ("`sparsity`", "1.5")),
    ("evaluate_not_a_bool", [_P, "--trainer.callbacks.evaluate=maybe"], ("evaluate", "maybe")),
    ("bits_overrides_one", [_Q, "--trainer.callbacks.bits_overrides={{net: 1}}"], ("bits_overrides", "1")),
    ("metric_unknown", [_Q, "--trainer.callbacks.metric=nope"], ("`metric`", "'nope'")),
]


@pytest.mark.parametrize(("args", "texts"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_refuses_with_a_message_and_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                                     texts: tuple[str, ...]) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "old.safetensors").write_bytes(b"a previous export")
    root = tmp_path / "root"  # no logger: each fit's files go to a fresh root/lightning_compress_runs/run_<n>
    with pytest.raises(SystemExit) as info:
        main([*_BASE, f"--trainer.default_root_dir={root}", *(a.format(tmp=tmp_path) for a in args)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in texts:
        assert text in err, f"{text!r} missing from: {err[-2000:]}"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [tmp_path / "old.safetensors"]  # no checkpoint, config or export: no step ran
    assert (tmp_path / "old.safetensors").read_bytes() == b"a previous export"
