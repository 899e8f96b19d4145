"""``AdaptiveCompression``'s planning of widths on the masks reached, at the end of the fit or when QAT starts: the
calibration batches (never read from the fit's loader mid-fit), the bound left to quantization after pruning (a pruned
model already outside it ends the fit) and the ``compress()`` call, which every rank makes: the Fisher and GPTQ run on
rank zero alone and every rank takes their results (:func:`on_rank_zero`), so every rank decides alike. The math is
:func:`~lightning_compress.adaptive.compress.compress`'s.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.compress import CORRECTIONS, FISHER_BATCHES, CompressionResult, compress
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.callbacks.quantization import _calibration_forward
from lightning_compress.integration import evaluation
from lightning_compress.integration.evaluation import eval_mode
from lightning_compress.quantization.carried import attach, carried, drop, forget

if TYPE_CHECKING:
    from lightning_compress.callbacks.adaptive import AdaptiveCompression

T = TypeVar("T")

# AdaptiveCompression arguments that choose a size / MACs plan's widths, with their defaults: a latency budget (the
# model compacted and delivered float) would ignore them, so they are refused there
WIDTHS_ONLY = (("method", "gptq"), ("calibration", "mse"), ("corrections", CORRECTIONS),
               ("calibration_batches", FISHER_BATCHES))


def refuse_ignored_by_latency(callback: AdaptiveCompression) -> None:
    """Raise naming each argument of :data:`WIDTHS_ONLY` set other than its default with a latency budget."""
    ignored = [f"`{name}`={getattr(callback, name)!r}" for name, default in WIDTHS_ONLY
               if getattr(callback, name) != default]
    if callback.budget.latency is not None and ignored:
        raise ValueError(f"`budget`={callback.budget!r} compacts the model and delivers it float, so "
                         f"{', '.join(ignored)} would be ignored (they choose a size / MACs plan's widths); allowed: "
                         "leave them at their defaults with a latency budget")


SEEN_STATE_BYTES = 64 * 2**20  # the most bytes of calibration batches a checkpoint carries while a plan is pending


class SeenBatches:
    """The first ``count`` training batches as the fit fed them, on CPU: the calibration batches of a plan made
    mid-fit (when QAT starts). Reading the fit's loader there would corrupt the epoch: with persistent workers,
    ``DataLoader.__iter__`` resets the very iterator the fit is consuming, which then replays and skips batches."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.batches: list[Any] = []

    def add(self, batch: Any) -> None:
        if len(self.batches) < self.count:
            self.batches.append(move_data_to_device(batch, torch.device("cpu")))

    def state(self) -> list[Any] | None:
        """The batches for a checkpoint written before the plan that needs them (a resume then plans on the same
        ones); None when their tensors exceed :data:`SEEN_STATE_BYTES` (a resume then reads its own, see
        :func:`calibration_batches`)."""
        size = 0

        def count(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal size
            size += tensor.numel() * tensor.element_size()
            return tensor

        apply_to_collection(self.batches, torch.Tensor, count)
        return list(self.batches) if size <= SEEN_STATE_BYTES else None


def calibration_batches(trainer: pl.Trainer, pl_module: pl.LightningModule, count: int,
                        seen: list[Any] | None) -> list[Any]:
    """Rank zero's first ``count`` training batches on every rank, on the model's device: ``seen`` (those the fit fed)
    mid-fit; read from the loader (``seen`` None) once the fit's loop is over, or mid-fit when nothing was seen (a
    resume at QAT's very step, QAT listed first) and the loader's workers are not persistent."""
    if seen is None or (not seen and not getattr(trainer.train_dataloader, "persistent_workers", False)):
        loader = trainer.train_dataloader
        with torch.random.fork_rng(devices=[]):  # the fit's random stream (samplers, workers' seeds) left as it was
            seen = list(itertools.islice(iter(loader), count)) if loader is not None else []
    if not seen:
        raise BudgetError("no calibration batch to plan the widths on: this fit resumed before QAT's plan from a "
                          f"checkpoint without its calibration batches (over {SEEN_STATE_BYTES} bytes), and its "
                          "training loader has persistent workers, which a read mid-fit would desynchronise; "
                          "allowed: resume from a checkpoint written after QAT started, or without persistent_workers",
                          None)
    return [trainer.strategy.batch_to_device(b, pl_module.device)
            for b in trainer.strategy.broadcast(list(seen[:count]), src=0)]


def bound_left(callback: AdaptiveCompression, now: float) -> float:
    """The drop quantization may add: ``max_metric_drop`` less the drop since the first pruning event (none spent
    when training gained). A pruned model already outside the bound (the metric drifted after the last event, which
    only event time gates) raises :class:`BudgetError`: no plan judged against it could bring the model back."""
    initial, bound = callback.controller.initial_metric, callback.max_metric_drop
    assert bound is not None
    verdict = callback.gate.judge(initial, now)
    spent = max(0.0, verdict.drop or 0.0)
    if not verdict.accepted:
        raise BudgetError(f"the pruned model at the end of the fit is already outside the bound: its metric {now:.6g} "
                          f"against {initial} before the first pruning event is a drop of {spent:.4g} > "
                          f"`max_metric_drop`={bound}, before any quantization; allowed: a looser bound, or a "
                          "pruning schedule that leaves more training after its last event", None)
    allowed = max(0.0, bound - spent)
    callback.report.gate[callback.report_name].update(pruning_drop=spent, quantization_allowed=allowed)
    return allowed


def plan(callback: AdaptiveCompression, trainer: pl.Trainer, pl_module: pl.LightningModule, method: str | None,
         mid_fit: bool, budget: Budget | None = None) -> CompressionResult:
    """``compress(search="bits")`` for ``budget`` (default the callback's) on the masks reached, on the bound left
    (the model measured once), on rank zero's calibration batches, Fisher and GPTQ codes."""
    budget = budget or callback.budget
    batches = calibration_batches(trainer, pl_module, callback.calibration_batches,
                                  callback.seen.batches if mid_fit else None)
    metric_fn, before, allowed = None, None, None
    rank_zero_info(f"AdaptiveCompression: planning widths for {budget!r} on the masks reached")
    with eval_mode(pl_module):
        if callback._has_val:
            def metric_fn(_: Any) -> float:
                return evaluation.evaluate(trainer, pl_module, callback.metric_spec)

            if callback.max_metric_drop is not None:
                before = metric_fn(pl_module)
                allowed = bound_left(callback, before)
        return compress(pl_module, budget, batches, forward=_calibration_forward, metric_fn=metric_fn,
                        max_metric_drop=allowed, higher_is_better=callback.metric_spec.higher_is_better,
                        calibration=callback.calibration, calibration_batches=len(batches) or 1,
                        corrections=callback.corrections, search="bits",
                        method=(method or callback.method) if batches else "rtn", before=before,
                        one_rank=on_rank_zero(trainer, pl_module.device))


def on_rank_zero(trainer: pl.Trainer, device: torch.device) -> Callable[[Callable[[], T]], T]:
    """``one_rank(work)``: ``work()`` on rank zero alone, its result (tensors, records of codes, plain values) handed to
    every rank on ``device``: the Fisher (every rank then plans alike) and GPTQ's codes (one rank computes what all
    would, and only rank zero's are kept anyway). Every rank calls it (one broadcast). A failure on rank zero raises on
    every rank: its own error there, a ``RuntimeError`` quoting it on the others (which would otherwise wait in the next
    collective)."""

    def one_rank(work: Callable[[], T]) -> T:
        if trainer.world_size < 2:
            return work()
        value: Any = None
        error: Exception | None = None
        if trainer.is_global_zero:
            try:
                value = _to(work(), torch.device("cpu"))
            except Exception as err:
                error = err
        value, failed = trainer.strategy.broadcast(
            (value, None if error is None else f"{type(error).__name__}: {error}"), src=0)
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(f"the work of rank zero that every rank takes (the Fisher, GPTQ) failed there: "
                               f"{failed}")
        return _to(value, device)

    return one_rank


def back_to_floats(pl_module: pl.LightningModule, floats: dict[str, torch.Tensor]) -> None:
    """Every entry of the model's state back to ``floats`` (taken before the codes were written), no codes carried."""
    with torch.no_grad():
        for key, value in pl_module.state_dict().items():
            value.copy_(floats[key])
    forget(pl_module)


def _to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it on ``device``: in dicts, tuples, lists and records of codes (a dataclass of
    tensors and settings)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(item, device) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _to(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def take_rank_zeros(trainer: pl.Trainer, pl_module: pl.LightningModule, result: CompressionResult) -> None:
    """Every rank's delivered model made rank zero's: its weights, the codes it carries and the plan's rows. Every
    rank decides on rank zero's Fisher and takes rank zero's GPTQ codes, but round to nearest or a QAT's trained
    codes on an accelerator can still differ by rounding from rank to rank, and rank zero's model is the one its
    file holds."""
    if trainer.world_size < 2:
        return
    record = carried(pl_module)
    mine = ({k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            _to(dict(record.codes), torch.device("cpu")) if record is not None else {},
            record.source if record is not None else "", result.plan)
    state, codes, source, result.plan = trainer.strategy.broadcast(mine, src=0)
    with torch.no_grad():
        for key, value in pl_module.state_dict().items():
            value.copy_(state[key])
    if record is not None:
        drop(pl_module, [key for key in record.codes if key not in codes])
    if codes:
        attach(pl_module, _to(codes, pl_module.device), source)
