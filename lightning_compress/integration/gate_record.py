"""What Lightning's validation loop saw, sample by sample, so that the gate's paired early stop needs no "before"
pass of its own.

During a validation right before a pruning event, :class:`SampleRecord` keeps, for every sample the loop handed
this rank, its dataset index, its label and whether the model's top-1 prediction was right. The event's "after" then
visits those same samples in a seeded random order and compares sample by sample
(:mod:`lightning_compress.core.sequential`): it stops as soon as the drop is clearly inside or outside the bound,
and having visited every sample it is exact. So the gate costs at most one pass, and usually a fraction of one.

When no validation ran right before the event, the gate's own full "before" pass
(:func:`lightning_compress.integration.evaluation.evaluate`) keeps the same record (:func:`evaluation_indices` gives
its order), so the "after" is paired just the same.

The loop's order must be known to map its batches to dataset indices: a map-style dataset read in a fixed order
(``SequentialSampler``, or Lightning's ``DistributedSampler`` without shuffling), one validation loader. Anything
else records nothing, and the event uses the whole set. The labels the "after" reads are checked against the
recorded ones; a mismatch (a dataset whose items change between reads) falls back to the whole set.

Which metrics: ``MulticlassAccuracy`` (top-1, no ``ignore_index``, global) with ``average="micro"`` or
``"weighted"`` (the mean of per-sample correctness) or ``"macro"``, torchmetrics' default (the mean of per-class
recalls): a sample of class ``k`` then weighs ``N / (K n_k)``, with ``n_k`` the class counts of the whole recorded
set, all ranks together, so the weighted per-sample mean is the macro accuracy exactly. Macro needs every class
present in the set (else torchmetrics' average depends on the predictions, and the whole set is used).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, SequentialSampler
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.integration.evaluation import MetricSpec, unpadded, validation_dataloaders

Weighting = Literal["micro", "macro"]


def paired_weighting(spec: MetricSpec) -> Weighting | None:
    """How one sample's correctness enters the metric: ``micro`` (equally; micro and weighted accuracy), ``macro``
    (by the inverse of its class's count), or None (not a mean of per-sample values: no paired rule)."""
    kwargs = spec.kwargs
    if not (issubclass(spec.cls, MulticlassAccuracy) and kwargs.get("top_k", 1) == 1
            and kwargs.get("ignore_index") is None and kwargs.get("multidim_average", "global") == "global"):
        return None
    average = kwargs.get("average", "macro")
    return "micro" if average in ("micro", "weighted") else "macro" if average == "macro" else None


def loop_indices(trainer: pl.Trainer) -> list[int] | None:
    """The dataset index of each sample the (single) validation loader hands this rank, in order; None when that
    order is not fixed or not known."""
    loaders = validation_dataloaders(trainer)
    if len(loaders) != 1 or not isinstance(loaders[0], DataLoader):
        return None
    loader = loaders[0]
    sampler = getattr(loader.batch_sampler, "sampler", None)
    fixed = isinstance(sampler, SequentialSampler) or (isinstance(sampler, DistributedSampler) and not sampler.shuffle)
    if isinstance(loader.dataset, IterableDataset) or not loader.batch_size or not fixed:
        return None
    return list(iter(sampler))  # type: ignore[arg-type]


def evaluation_indices(trainer: pl.Trainer) -> list[int] | None:
    """The dataset index of each sample :func:`lightning_compress.integration.evaluation.evaluate` hands this rank,
    in order (under DDP its own unpadded shard; one process: the loader's fixed order); None when not known."""
    loaders = validation_dataloaders(trainer)
    if len(loaders) != 1 or not isinstance(loaders[0], DataLoader):
        return None
    shard = unpadded(loaders[0], trainer.global_rank, trainer.world_size)
    if shard is not loaders[0]:
        return list(shard.sampler)  # unpadded's own list of indices
    return loop_indices(trainer) if trainer.world_size == 1 else None


def correct_top1(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Per-sample correctness of class scores ``(N, C)`` against labels ``(N,)``; None for any other layout."""
    if not (preds.is_floating_point() and preds.dim() == 2 and target.dim() == 1 and not target.is_floating_point()):
        return None
    return preds.argmax(1) == target


class SampleRecord:
    """Per-sample correctness and labels of one validation, on this rank, in the loop's order (see the module)."""

    def __init__(self, indices: list[int], weighting: Weighting) -> None:
        self.indices, self.weighting = indices, weighting
        self._correct: list[torch.Tensor] = []
        self._target: list[torch.Tensor] = []
        self.valid = True
        self.correct = self.target = self.positions = torch.empty(0)
        self.weights: torch.Tensor | None = None  # per class: a sample's weight in the per-sample mean
        self.population = 0  # samples recorded, all ranks
        self.width = 0  # classes in the predictions (their last dimension), for a metric told no num_classes

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.width = int(preds.shape[-1]) if preds.dim() else 0  # the same on every rank, valid or not
        correct = correct_top1(preds, target) if self.valid else None
        if correct is None:
            self.valid = False
            return
        self._correct.append(correct.cpu())
        self._target.append(target.detach().cpu())

    def finish(self, trainer: pl.Trainer, num_classes: int) -> bool:
        """Gather this rank's record and decide, on reduced numbers (every rank calls it and agrees), whether it
        can serve the paired rule; returns that."""
        seen = sum(len(c) for c in self._correct)
        target = torch.cat(self._target) if self.valid and self._target else torch.zeros(0, dtype=torch.long)
        usable = self.valid and seen <= len(self.indices) and bool(target.numel()) and \
            int(target.min()) >= 0 and int(target.max()) < num_classes
        counts = torch.bincount(target, minlength=num_classes).double() if usable else torch.zeros(num_classes)
        totals = torch.cat([counts.to(torch.float64), torch.tensor([float(not usable)], dtype=torch.float64)])
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        counts, broken = totals[:-1], float(totals[-1]) > 0
        if broken or (self.weighting == "macro" and bool((counts == 0).any())):
            self.valid = False
            return False
        self.population = int(counts.sum())
        self.weights = self.population / (num_classes * counts) if self.weighting == "macro" else \
            torch.ones(num_classes, dtype=torch.float64)
        self.correct, self.target = torch.cat(self._correct).double(), target
        self.positions = torch.tensor(self.indices[:seen])
        self._correct, self._target = [], []
        return True

    def loader(self, trainer: pl.Trainer, seed: int, max_batches: int | None) -> tuple[DataLoader, torch.Tensor]:
        """The recorded samples in a seeded random order (at most ``max_batches`` batches), and their positions in
        the record."""
        source: Any = validation_dataloaders(trainer)[0]
        order = torch.randperm(len(self.correct), generator=torch.Generator().manual_seed(seed))
        if max_batches is not None:
            order = order[: max_batches * source.batch_size]
        loader = DataLoader(source.dataset, batch_size=source.batch_size, sampler=self.positions[order].tolist(),
                            collate_fn=source.collate_fn, num_workers=source.num_workers)
        return loader, order
