"""Evaluate a LightningModule on the trainer's validation data with a torchmetrics metric.

Both callbacks call :func:`evaluate` after each compression step. The metric is a torchmetrics ``Metric``
given by class path (YAML-friendly), so its ``compute()`` merges the states of all ranks (sums and counts, not
averages of averages) and every rank gets the same value and takes the same rollback / fallback decision.

Batch convention: a batch is ``(inputs, targets, ...)`` and ``module(inputs)`` returns predictions. A module
with another layout defines ``compression_step(batch) -> (preds, targets)``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics import Metric

from lightning_compress.core.modes import eval_mode
from lightning_compress.integration import _compat

DEFAULT_METRIC = "torchmetrics.classification.MulticlassAccuracy"


def resolve_metric_class(class_path: str, argument: str = "metric") -> type[Metric]:
    module_path, _, name = class_path.rpartition(".")
    cls = None
    if module_path:
        try:
            cls = getattr(importlib.import_module(module_path), name, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        raise ValueError(
            f"`{argument}` must be the class path of a torchmetrics Metric "
            f"(e.g. {DEFAULT_METRIC!r}), got {class_path!r}"
        )
    return cls


class MetricSpec:
    """A metric class plus its keyword arguments, built on first use.

    ``num_classes``, when the class takes it and it is not given, is read off the last dimension of the
    first predictions, so the default ``MulticlassAccuracy`` needs no configuration.
    """

    def __init__(self, class_path: str = DEFAULT_METRIC, kwargs: dict[str, Any] | None = None) -> None:
        self.class_path = class_path
        self.cls = resolve_metric_class(class_path)
        self.kwargs = dict(kwargs or {})
        params = inspect.signature(self.cls.__init__).parameters
        num_classes = params.get("num_classes")
        self._infer_num_classes = (
            num_classes is not None
            and num_classes.default in (inspect.Parameter.empty, None)
            and "num_classes" not in self.kwargs
        )
        try:  # build once now, so that a bad keyword fails at construction, not after hours of training
            self.cls(**self.kwargs, **({"num_classes": 2} if self._infer_num_classes else {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"`metric_kwargs`={self.kwargs} are not valid for {class_path}: {err}") from None

    @property
    def higher_is_better(self) -> bool:
        return self.cls.higher_is_better is not False

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def description(self) -> str:
        """The metric with the arguments that change its meaning, e.g. ``MulticlassAccuracy(average='macro')``
        (torchmetrics' classification metrics average per class by default, which differs from the fraction of
        correct predictions on unbalanced data)."""
        params = inspect.signature(self.cls.__init__).parameters
        shown = dict(self.kwargs)
        average = params.get("average")
        if average is not None and "average" not in shown and average.default is not inspect.Parameter.empty:
            shown["average"] = average.default
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def build(self, example_preds: torch.Tensor, **extra: Any) -> Metric:
        kwargs = dict(self.kwargs)
        if self._infer_num_classes and example_preds.is_floating_point() and example_preds.dim() >= 2:
            kwargs["num_classes"] = int(example_preds.shape[-1])
        return self.cls(**kwargs, **extra)


def has_validation_data(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether the fit has validation batches the callbacks can evaluate on (call in ``setup``)."""
    return (
        _compat.validation_source_defined(trainer)
        and trainer.limit_val_batches != 0
        and is_overridden("validation_step", pl_module)
    )


def validation_dataloaders(trainer: pl.Trainer) -> list[Iterable[Any]]:
    """The trainer's validation dataloaders (with the DistributedSampler Lightning adds under DDP), loading
    them if validation has not run yet."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    if trainer.val_dataloaders is None:
        val_loop.setup_data()
    loaders = trainer.val_dataloaders
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def unpadded(loader: Any, rank: int, world_size: int) -> Any:
    """Under DDP, this rank's shard of a map-style dataset, without padding: every sample exactly once across
    ranks (Lightning's ``DistributedSampler`` pads by repeating samples, which a synced metric would count twice; a
    datamodule's test loader has no sampler at all). Anything else is returned as it is."""
    if world_size == 1 or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return loader
    if len(loader.dataset) < world_size:  # type: ignore[arg-type]  # keep the padding: a rank without a batch builds no metric and raises alone
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=list(range(rank, len(loader.dataset), world_size)),  # type: ignore[arg-type]
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def predict(pl_module: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    step = getattr(pl_module, "compression_step", None)
    if callable(step):
        return step(batch)
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError(
            "lightning_compress evaluates batches shaped `(inputs, targets, ...)`; got a batch of type "
            f"{type(batch).__name__}. Define `compression_step(self, batch) -> (preds, targets)` on your "
            "LightningModule to tell it how to evaluate yours."
        )
    return pl_module(batch[0]), batch[1]


@torch.no_grad()
def dry_run(trainer: pl.Trainer, pl_module: pl.LightningModule, spec: MetricSpec, argument: str) -> None:
    """Run the evaluation path on one validation batch (no collective), so that a batch layout the callbacks
    cannot read, or a metric that does not fit the model's outputs, fails in ``setup``, not after the fit."""
    loaders = validation_dataloaders(trainer)
    batch = next((b for loader in loaders for b in loader), None)
    if batch is None:
        return
    try:
        with eval_mode(pl_module):
            batch = trainer.strategy.batch_to_device(batch, pl_module.device, dataloader_idx=0)
            with trainer.precision_plugin.forward_context():
                preds, target = predict(pl_module, batch)
            metric = spec.build(preds, sync_on_compute=False).to(pl_module.device)
            metric.update(preds.float() if preds.is_floating_point() else preds, target)
            metric.compute()
    except Exception as err:
        raise ValueError(
            f"{argument}: evaluating one validation batch with `metric`={spec.class_path!r}, `metric_kwargs`="
            f"{spec.kwargs!r} failed, so the metric could not be measured after a compression step: "
            f"{type(err).__name__}: {err}"
        ) from err


def test_dataloaders(trainer: pl.Trainer) -> list[Iterable[Any]]:
    """The datamodule's test dataloaders when it defines ``test_dataloader`` (else none), for the evaluation of the
    delivered model; sharded per rank by :func:`evaluate` like the validation data."""
    datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by a connector, invisible to mypy
    if datamodule is None or not is_overridden("test_dataloader", datamodule):
        return []
    loaders = datamodule.test_dataloader()
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


@torch.no_grad()
def evaluate(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    spec: MetricSpec,
    loaders: list[Iterable[Any]] | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> float:
    """The metric over the whole validation set (or ``loaders``), all ranks together, as a Python float that is
    identical on every rank. The validation data honours ``limit_val_batches``. ``observe(preds, target)`` sees each
    batch of the first loader, in this rank's order (:func:`unpadded`), so that a caller can keep what the pass saw
    sample by sample (the gate's per-sample record) without a pass of its own."""
    if loaders is None:
        loaders = validation_dataloaders(trainer)
        limits = trainer.num_val_batches if isinstance(trainer.num_val_batches, list) else []
    else:
        limits = []
    metric: Metric | None = None
    with eval_mode(pl_module):
        for index, loader in enumerate(loaders):
            limit = limits[index] if index < len(limits) else float("inf")
            for batch_idx, batch in enumerate(unpadded(loader, trainer.global_rank, trainer.world_size)):
                if batch_idx >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch, pl_module.device, dataloader_idx=index)
                with trainer.precision_plugin.forward_context():
                    preds, target = predict(pl_module, batch)
                if metric is None:
                    metric = spec.build(preds).to(pl_module.device)
                metric.update(preds.float() if preds.is_floating_point() else preds, target)
                if observe is not None and index == 0:
                    observe(preds, target)
    if metric is None:
        raise RuntimeError("the dataloaders yielded no batch: nothing to evaluate the compression on")
    value = metric.compute()
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def first_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule, purpose: str, batch: Any = None) -> Any:
    """Two examples of the first training batch ``(inputs, targets, ...)`` (or of ``batch``, a hook's: iterating
    the loader again would start a second pass over it, which a resumable loader counts), for an analysis of a model
    that has no ``example_input_array``; a ``ValueError`` says what to set when the batches do not show what the
    forward takes."""
    if batch is None:
        loader = trainer.train_dataloader
        batch = next(iter(loader), None) if loader is not None else None
    if not (isinstance(batch, (list, tuple)) and isinstance(batch[0], torch.Tensor)):
        raise ValueError(
            f"{purpose} runs the model on an example input: set `example_input_array` on {type(pl_module).__name__} "
            f"(a tensor, a tuple of arguments or a dict of keyword arguments); its training batches "
            f"({type(batch).__name__}) do not say what the forward takes"
        )
    return batch[0][:2].to(pl_module.device)
