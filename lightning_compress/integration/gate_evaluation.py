"""The metric around one pruning event, as cheaply as the gate's guarantee allows.

:class:`EventEvaluation` answers the two questions :meth:`lightning_compress.pruning.run.PruningRun.event` asks
(the metric before the step, the metric after it) and records which rule answered each, on how many samples:

- **before**: the value the callback computed during Lightning's validation loop when no optimizer step and no
  pruning event changed the weights since (``reused validation``), else the whole validation set (``full set``),
  which then keeps the same per-sample record as such a validation would (``per-sample record kept``: short fits and
  explicit per-step schedules, whose events do not follow a validation).
- **after**, with a per-sample record, the validation's or the full "before" pass's
  (:mod:`lightning_compress.integration.gate_record`: top-1 ``MulticlassAccuracy``, macro by default, micro or
  weighted): the paired per-sample differences on the recorded samples in a seeded order, with
  :mod:`lightning_compress.core.sequential`'s early stop (``early stop at n samples``), exact once every sample is
  seen (``every sample``). With ``gate_batches=k`` on at most k batches per rank of them, or, without a record, of a
  fixed, seeded subset that is also measured before the step (micro accuracy only); when that leaves the step
  undecided (close to the bound), the whole set (``full set``). Without a bound nothing is decided by the metric, so
  the subset's estimate is the answer (``subset estimate``). ``gate_batches=0``, any other metric, or no record: the
  whole set.

The subset's sums are all-reduced after each batch, so every rank stops at the same batch and decides alike; the
ranks first agree on the largest number of batches any of them holds (shards can be unequal: 129 samples on 2
ranks in batches of 64 are 2 batches and 1), and a rank that has run out adds zeros until then.

An "after" answered before every sample was seen (an early stop, or a subset without a bound) is an *estimate*:
:attr:`EventEvaluation.estimate` holds it with its interval and the samples it saw, so that the report can say so
instead of showing it as the measured metric.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_compress.core.modes import eval_mode
from lightning_compress.core.sequential import DEFAULT_CONFIDENCE, PairedDifference, look_confidence
from lightning_compress.integration import evaluation
from lightning_compress.integration.evaluation import MetricSpec, predict, validation_dataloaders
from lightning_compress.integration.gate_record import SampleRecord, evaluation_indices, loop_indices, paired_weighting

SUBSET_SEED = 0  # the subset is the same at every event of a fit (and of every fit of the same data)


def has_per_sample_value(spec: MetricSpec) -> bool:
    """Whether the metric is the plain mean of one value per sample (micro / weighted top-1 accuracy), so a paired
    early stop on a subset drawn without the validation's record judges exactly what the full metric would."""
    return paired_weighting(spec) == "micro"


def subset_loader(trainer: pl.Trainer, gate_batches: int) -> DataLoader | None:
    """``gate_batches`` batches per rank of the first validation loader's dataset, at positions drawn once with a
    fixed seed and split between ranks without overlap; None when the data cannot be indexed."""
    loaders = validation_dataloaders(trainer)
    loader = loaders[0] if loaders else None
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) or not loader.batch_size:
        return None
    size = len(loader.dataset)  # type: ignore[arg-type]
    order = torch.randperm(size, generator=torch.Generator().manual_seed(SUBSET_SEED)).tolist()
    taken = order[: gate_batches * loader.batch_size * trainer.world_size]
    mine = taken[trainer.global_rank::trainer.world_size]
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=mine, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers)


@torch.no_grad()
def _correct(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-1 correctness (float64, on the CPU) and the labels."""
    batch = trainer.strategy.batch_to_device(batch, pl_module.device, dataloader_idx=0)
    with trainer.precision_plugin.forward_context():
        preds, target = predict(pl_module, batch)
    labels = preds.argmax(1) if preds.is_floating_point() and preds.dim() > target.dim() else preds  # torchmetrics
    return (labels == target).reshape(-1).double().cpu(), target


class EventEvaluation:
    """One event's two measurements (call :meth:`before`, then :meth:`after`); :attr:`rules` says how each was
    made. ``reused``: the value of the validation that just ended with these weights, or None; ``record``: that
    validation's per-sample record (:mod:`lightning_compress.integration.gate_record`), or None. ``gate_batches``:
    None (the record's samples when there is one, else the whole set), 0 (always the whole set), or k batches per
    rank (of the record, else of a seeded subset measured before the step too)."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, spec: MetricSpec, reused: tuple[float, int]
                 | None, gate_batches: int | None, allowed_drop: Any, confidence: float = DEFAULT_CONFIDENCE,
                 record: SampleRecord | None = None) -> None:
        self.trainer, self.module, self.spec = trainer, pl_module, spec
        self.reused = reused
        self.allowed_drop = allowed_drop  # callable: metric before -> the drop the gate allows (None: no bound)
        self.confidence = confidence
        self.gate_batches = gate_batches
        self.record = record if reused is not None and gate_batches != 0 else None
        self.subset: DataLoader | None = None  # decided in before(): only when no record could be kept
        self.rules: list[str] = []
        self.evaluations = 0  # passes over data (full set or subset)
        self.samples = 0  # samples those passes evaluated (all ranks)
        self._before: float | None = None
        self._before_correct: list[torch.Tensor] = []
        self.estimate: dict[str, Any] | None = None  # an "after" estimated on part of the set (see the module)

    def _full(self, record: SampleRecord | None = None) -> float:
        self.evaluations += 1
        self.samples += _set_size(self.trainer)
        observe = record.update if record is not None else None
        return evaluation.evaluate(self.trainer, self.module, self.spec, observe=observe)

    def before(self) -> float | None:
        if self.reused is not None:
            self._before, samples = self.reused
            self.rules.append(f"before: reused validation ({samples} samples)")
        else:
            self._before = self._full_recorded()
        wants_subset = self.record is None and self.gate_batches and has_per_sample_value(self.spec)
        self.subset = subset_loader(self.trainer, self.gate_batches) if wants_subset and self.gate_batches else None
        if self.subset is not None:
            with eval_mode(self.module):
                self._before_correct = [_correct(self.trainer, self.module, b)[0] for b in self.subset]
            self.samples += sum(len(c) for c in self._before_correct) * self.trainer.world_size
        return self._before

    def _full_recorded(self) -> float:
        """The whole set before the step, keeping its per-sample record (as the validation's would be) when the
        metric and the data allow one, so that the "after" is paired on the same samples."""
        weighting = paired_weighting(self.spec) if self.gate_batches != 0 else None
        indices = evaluation_indices(self.trainer) if weighting is not None else None
        record = SampleRecord(indices, weighting) if indices is not None and weighting is not None else None
        value = self._full(record)
        if record is not None and record.finish(self.trainer, self._classes(record)):  # every rank, reduced
            self.record = record
            self.rules.append(f"before: full set, per-sample record kept ({record.population} samples)")
        else:
            self.rules.append("before: full set")
        return value

    def _classes(self, record: SampleRecord) -> int:
        """The metric's number of classes: given, or read off the predictions as :class:`MetricSpec` does."""
        given = self.spec.kwargs.get("num_classes")
        return int(given) if given is not None else record.width

    def after(self) -> float | None:
        before_metric = self._before
        if before_metric is not None and self.record is not None:
            return self._paired(before_metric, *self._recorded(self.record))
        if self.subset is None or before_metric is None:
            self.rules.append("after: full set")
            return self._full()
        pairs = ((b, c, None, None) for b, c in zip(self.subset, self._before_correct))
        return self._paired(before_metric, len(self._before_correct), pairs)

    def _recorded(self, record: SampleRecord) -> tuple[int, Any]:
        """This rank's number of batches, and (batch, correct before, weight per sample, recorded labels) of the
        record's samples in a seeded order."""
        weights = record.weights if record.weights is not None else torch.ones(1, dtype=torch.float64)
        loader, order = record.loader(self.trainer, SUBSET_SEED, self.gate_batches)
        size = loader.batch_size or 1

        def pairs() -> Any:
            for i, batch in enumerate(loader):  # the sampler's list in chunks of batch_size: chunk i is batch i
                chosen = order[i * size: (i + 1) * size]
                yield batch, record.correct[chosen], weights[record.target[chosen]], record.target[chosen]
        return len(loader), pairs()

    def _sums(self, batch: Any, before: torch.Tensor, weights: torch.Tensor | None, labels: Any) -> torch.Tensor:
        """This batch's (sum of d, sum of d squared, count, label mismatch) for the all-reduce."""
        after, target = _correct(self.trainer, self.module, batch)
        d = (before - after) * (weights if weights is not None else 1.0)
        mismatch = float(labels is not None and not torch.equal(labels, target.detach().cpu().reshape(-1)))
        return torch.tensor([float(d.sum()), float((d * d).sum()), float(d.numel()), mismatch], dtype=torch.float64)

    def _estimate(self, before_metric: float, paired: PairedDifference, rule: str) -> float:
        """Record an "after" that saw part of the set as an estimate (with its interval at the level the rule
        used), and return it for the gate."""
        low, high = paired.interval(look_confidence(self.confidence, paired.population))
        self.estimate = {"value": before_metric - paired.mean, "low": before_metric - high,
                         "high": before_metric - low, "samples": paired.count, "population": paired.population}
        self.rules.append(rule)
        return before_metric - paired.mean

    def _paired(self, before_metric: float, batches: int, pairs: Any) -> float:
        """The sequential paired test over ``pairs`` (see :mod:`lightning_compress.core.sequential`); ``batches``:
        how many this rank holds (the ranks run to the largest such number, see the module)."""
        allowed = self.allowed_drop(before_metric)
        population = self.record.population if self.record is not None else self._population()
        weights = self.record.weights if self.record is not None else None
        paired = PairedDifference(population=population, scale=float(weights.max()) if weights is not None else 1.0)
        steps = self.trainer.strategy.reduce(torch.tensor(float(batches), dtype=torch.float64), reduce_op="max")
        pairs = iter(pairs)
        self.evaluations += 1
        with eval_mode(self.module):
            for _ in range(int(steps.item())):
                item = next(pairs, None)  # None: this rank's shard is done, it adds nothing but joins the reduce
                sums = self._sums(*item) if item is not None else torch.zeros(4, dtype=torch.float64)
                total, squares, count, mismatches = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
                self.samples += int(count)
                if mismatches:
                    self.rules.append("after: full set (the validation's samples could not be matched)")
                    return self._full()
                paired.add(total, squares, int(count))
                if paired.count >= population:
                    self.rules.append(f"after: every sample ({paired.count}, exact)")
                    return before_metric - paired.mean
                if allowed is not None and paired.decide(allowed, self.confidence) != "undecided":
                    return self._estimate(before_metric, paired, f"after: early stop at {paired.count} samples")
        if allowed is None:
            return self._estimate(before_metric, paired, f"after: subset estimate ({paired.count} samples, no bound)")
        self.rules.append(f"after: full set (close to the bound after {paired.count} samples)")
        return self._full()

    def _population(self) -> int:
        loader = validation_dataloaders(self.trainer)[0]
        return len(loader.dataset)  # type: ignore[attr-defined]

    def describe(self) -> str:
        return "; ".join(self.rules)


class ValidationTap:
    """The gate's metric computed during Lightning's own validation loop (same metric definition, same batches),
    so that an event right after a validation needs no "before" pass. The predictions are those of the loop's own
    forward (a forward hook keeps the output of the one call whose input is the batch's ``inputs``); a
    ``validation_step`` that calls the model otherwise (or a ``compression_step``) costs one forward more per
    batch. ``version``: what the weights were when it was measured (optimizer steps and kept pruning steps); the
    value is reused only while it has not changed."""

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self._metric: Any = None
        self._samples = 0
        self._on = False
        self._hook: Any = None
        self._calls: list[tuple[Any, Any]] = []  # (inputs, output) of the forward calls in this batch
        self.extra_forwards = 0  # batches whose predictions the loop's forward did not give
        self.value: tuple[float, int] | None = None  # (metric, samples)
        self.record: SampleRecord | None = None  # per sample, for the paired rule (see gate_record)
        self.version: tuple[int, int] | None = None

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, wanted: bool) -> None:
        """Tap this validation when an event is expected right after it and the loop sees each sample once (no
        sampler padding under DDP, which our own evaluation leaves out)."""
        self._metric, self._samples, self.value, self._calls, self.record = None, 0, None, [], None
        self._on = wanted and not trainer.sanity_checking and _unpadded(trainer)
        weighting = paired_weighting(self.spec)
        indices = loop_indices(trainer) if self._on and weighting is not None else None
        if indices is not None and weighting is not None:
            self.record = SampleRecord(indices, weighting)
        if self._on and self._hook is None:
            self._hook = pl_module.register_forward_hook(lambda _, args, output: self._calls.append((args, output)))

    @torch.no_grad()
    def update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        calls, self._calls = self._calls, []
        if not self._on:
            return
        if _own_forward(pl_module, batch, calls):
            preds, target = calls[0][1], batch[1]
        else:
            self.extra_forwards += 1
            with trainer.precision_plugin.forward_context():
                preds, target = predict(pl_module, batch)
        if self._metric is None:
            self._metric = self.spec.build(preds).to(pl_module.device)
        self._metric.update(preds.float() if preds.is_floating_point() else preds, target)
        self._samples += int(target.shape[0])
        if self.record is not None:
            self.record.update(preds, target)

    def end(self, trainer: pl.Trainer, version: tuple[int, int]) -> None:
        self.detach()
        if not self._on or self._metric is None:
            return
        value = self._metric.compute()  # every rank: torchmetrics syncs the sums
        samples = int(trainer.strategy.reduce(torch.tensor(float(self._samples)), reduce_op="sum").item())
        self.value, self.version, self._on = (float(value.item()), samples), version, False
        if self.record is not None and not self.record.finish(trainer, int(getattr(self._metric, "num_classes", 0))):
            self.record = None

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def reusable(self, version: tuple[int, int]) -> tuple[float, int] | None:
        return self.value if self.value is not None and self.version == version else None

    def reusable_record(self, version: tuple[int, int]) -> SampleRecord | None:
        return self.record if self.reusable(version) is not None else None


def _own_forward(pl_module: pl.LightningModule, batch: Any, calls: list[tuple[Any, Any]]) -> bool:
    """Whether the loop's forward calls of this batch were one ``module(inputs)`` on the batch's own inputs, giving
    the predictions :func:`predict` would compute."""
    if callable(getattr(pl_module, "compression_step", None)) or len(calls) != 1:
        return False
    args, output = calls[0]
    return (isinstance(batch, (list, tuple)) and len(batch) >= 2 and len(args) == 1 and args[0] is batch[0]
            and isinstance(output, torch.Tensor))


def _set_size(trainer: pl.Trainer) -> int:
    """Samples in the validation sets (a full pass evaluates each once)."""
    sizes = [len(lo.dataset) for lo in validation_dataloaders(trainer)  # type: ignore[arg-type]
             if isinstance(lo, DataLoader) and not isinstance(lo.dataset, IterableDataset)]
    return sum(sizes)


def _unpadded(trainer: pl.Trainer) -> bool:
    """Whether Lightning's validation loop sees every sample exactly once (one process, or sets that split evenly)."""
    if trainer.world_size == 1:
        return True
    loaders = validation_dataloaders(trainer)
    return all(isinstance(lo, DataLoader) and not isinstance(lo.dataset, IterableDataset)
               and len(lo.dataset) % trainer.world_size == 0  # type: ignore[arg-type]
               for lo in loaders)
