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
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
from torchmetrics import Metric

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

    def build(self, example_preds: torch.Tensor) -> Metric:
        kwargs = dict(self.kwargs)
        if self._infer_num_classes and example_preds.is_floating_point() and example_preds.dim() >= 2:
            kwargs["num_classes"] = int(example_preds.shape[-1])
        return self.cls(**kwargs)


def has_validation_data(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether the fit has validation batches the callbacks can evaluate on (call in ``setup``)."""
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    return bool(source.is_defined() and trainer.limit_val_batches != 0) and is_overridden("validation_step", pl_module)


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
    """Lightning's ``DistributedSampler`` pads the validation set to a multiple of the world size by repeating
    samples, which a synced metric would count twice. For a map-style dataset, shard it without padding
    (every sample exactly once across ranks); anything else is returned as it is."""
    if world_size == 1 or not isinstance(loader, DataLoader) or not isinstance(loader.sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return loader
    if len(loader.dataset) < world_size:  # keep the padding: a rank without a batch builds no metric and raises alone
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=list(range(rank, len(loader.dataset), world_size)),  # type: ignore[arg-type]
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def predict(pl_module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
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
def evaluate(trainer: pl.Trainer, pl_module: pl.LightningModule, spec: MetricSpec) -> float:
    """The metric over the whole validation set (all ranks), as a Python float, identical on every rank."""
    loaders = validation_dataloaders(trainer)
    limits = trainer.num_val_batches if isinstance(trainer.num_val_batches, list) else []
    was_training = pl_module.training
    pl_module.eval()
    metric: Metric | None = None
    try:
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
    finally:
        pl_module.train(was_training)
    if metric is None:
        raise RuntimeError("the validation dataloaders yielded no batch: nothing to evaluate the compression on")
    value = metric.compute()
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def metric_drop(before: float, after: float, higher_is_better: bool) -> float:
    """How much worse ``after`` is than ``before``, in the metric's own units (negative when it improved)."""
    return before - after if higher_is_better else after - before
