"""Probes for the 2-process DDP runs of ``tests/callbacks/test_ddp.py`` (the scenarios are in ``scenarios.py``).

Workers never assert (an assertion on one rank would leave the other waiting in a collective): the probes all-gather
what every rank saw and write it to ``OUT_DIR/<tag>.rank<r>.json``; the test asserts on those files. Every callback
is defined at module level, because ``ddp_spawn`` pickles the trainer to its workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDPStrategy
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_compress import GradientStabilityPruning
from lightning_compress.demos.data import DigitsDataModule
from tests.helpers import StopAfterEpoch  # noqa: F401 - used by the scenarios

ARTIFACTS = "artifacts"  # what the library writes (exports, reports); the probes write to OUT_DIR itself


# --------------------------------------------------------------------------- small utilities
def digest(tensors: dict[str, Tensor] | list[Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal digests <=> bitwise-equal tensors."""
    items = sorted(tensors.items()) if isinstance(tensors, dict) else list(enumerate(tensors))
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def stats_digest(stats: Any) -> str | None:
    """Digest of every tensor of the gradient statistics' state (running means and M2) plus the counts."""
    if stats is None:
        return None
    state = stats.state_dict()
    flat: dict[str, Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        elif isinstance(value, (int, float)):
            flat[prefix] = torch.tensor(value, dtype=torch.float64)

    walk("stats", state)
    return digest(flat)


def gather(obj: Any) -> list[Any]:
    """``obj`` of every rank (rank order), through ``torch.distributed.all_gather_object``; ``[obj]`` alone.
    Not counted by :func:`count_collectives` (the probes' own traffic)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    _ORIGINAL.get("all_gather_object", dist.all_gather_object)(out, obj)
    return out


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
                "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv")
_ORIGINAL: dict[str, Any] = {}
_COUNTS: dict[str, Any] = {"bucket": None}


def count_collectives() -> None:
    """Count the ``torch.distributed`` collectives Python code calls (Lightning, torchmetrics, the callbacks) into
    ``_COUNTS["bucket"]`` while it is a dict. DDP's gradient all-reduce runs in C++ and is not seen. Workers only."""
    if _ORIGINAL:
        return
    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue
        _ORIGINAL[name] = original

        def counted(*args: Any, __name: str = name, __original: Any = original, **kwargs: Any) -> Any:
            bucket = _COUNTS["bucket"]
            if bucket is not None:
                bucket[__name] = bucket.get(__name, 0) + 1
            return __original(*args, **kwargs)

        setattr(dist, name, counted)


def pruning_of(trainer: pl.Trainer) -> GradientStabilityPruning:
    return next(c for c in trainer.callbacks if isinstance(c, GradientStabilityPruning))


def quantization_of(trainer: pl.Trainer) -> Any:
    return next((c for c in trainer.callbacks if type(c).__name__ == "PostTrainingQuantization"), None)


def full_val_metric(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
    """Macro accuracy (the default metric) over the *whole* validation split, on this rank alone: the value a synced
    metric must equal. ``datamodule.val_dataloader()`` is the plain loader, without Lightning's DistributedSampler."""
    preds, target = [], []
    was_training = pl_module.training
    pl_module.eval()
    with torch.no_grad():
        for x, y in trainer.datamodule.val_dataloader():
            preds.append(pl_module(x).float())
            target.append(y)
    pl_module.train(was_training)
    return float(multiclass_accuracy(torch.cat(preds), torch.cat(target), num_classes=10))


_AUDIT: dict[str, Any] = {"root": None, "writes": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event: str, args: tuple) -> None:
    root = _AUDIT["root"]
    if root is None or event not in ("open", "os.rename", "os.remove", "os.mkdir", "os.truncate", "os.link"):
        return
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        paths = [path] if writing else []
    else:
        paths = [a for a in args[:2]]
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            text = os.fsdecode(path)
            if os.path.abspath(text).startswith(root):
                _AUDIT["writes"].append(f"{event} {os.path.relpath(os.path.abspath(text), root)}")


def install_write_audit(root: str | Path) -> None:
    """Record every file-system write this process makes under ``root`` (Python audit hooks see ``open``,
    ``os.open`` / ``mkstemp``, ``os.replace``, ...). Only in worker processes: a hook cannot be removed."""
    if _AUDIT["root"] is None:
        sys.addaudithook(_audit)
    _AUDIT["root"] = os.path.abspath(root)
    _AUDIT["writes"] = []


# --------------------------------------------------------------------------- probes
class _PreEvent(Callback):
    """Listed *before* the pruning callback: at each tick of its schedule, the state the decision will use. Opens
    the per-batch bucket of collectives that ``RankProbe`` closes after the compression callbacks."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.collectives: list[dict[str, Any]] = []  # one per training batch: step after it, collectives called
        self._seen: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if _ORIGINAL:
            _COUNTS["bucket"] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pruning = pruning_of(trainer)
        tick = trainer.global_step
        if pruning.config.schedule_unit != "step" or tick in self._seen or not pruning.schedule.is_event(tick):
            return
        self._seen.add(tick)
        mine = {
            "tick": tick,
            "stats": stats_digest(pruning.stats),
            "stats_count": pruning.stats.count if pruning.stats is not None else None,
            "weights": digest(dict(pl_module.named_parameters())),
        }
        self.records.append({"tick": tick, "ranks": gather(mine)})


class RankProbe(Callback):
    """Listed *after* the compression callbacks. At each schedule tick it all-gathers the masks, weights and metric
    every rank ended up with; at the end of fit the final state, the optimizer-step count and (optionally) the files
    this rank wrote under ``OUT_DIR/artifacts``. ``callbacks()`` gives ``[pre-event probe, *middle, self]``."""

    def __init__(self, out_dir: str | Path, tag: str, audit: bool = False, slow_export_s: float = 0.0) -> None:
        self.out_dir = str(out_dir)
        self.tag = tag
        self.audit = audit
        self.slow_export_s = slow_export_s
        self.pre = _PreEvent()
        self.events: list[dict[str, Any]] = []
        self.optimizer_steps = 0
        self.backward_calls = 0
        self._seen: set[int] = set()

    def callbacks(self, *middle: Callback) -> list[Callback]:
        return [self.pre, *middle, self]

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.world_size > 1:
            torch.set_num_threads(1)  # 2 workers on a shared 2-core machine
        if trainer.world_size > 1:
            count_collectives()
        if self.audit:
            install_write_audit(Path(self.out_dir) / ARTIFACTS)
        if self.slow_export_s and trainer.is_global_zero:
            # rank 0 takes a while to write the export: a rank that did not wait for it would find no file
            import lightning_compress.callbacks.quantization as qc

            original, delay = qc.save_quantized, self.slow_export_s

            def slow_save(*args: Any, **kwargs: Any) -> Any:
                time.sleep(delay)
                return original(*args, **kwargs)

            qc.save_quantized = slow_save

    def on_after_backward(self, trainer, pl_module) -> None:
        self.backward_calls += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.optimizer_steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _COUNTS["bucket"] is not None:
            self.pre.collectives.append({"step": trainer.global_step, "calls": _COUNTS["bucket"]})
            _COUNTS["bucket"] = None
        pruning = pruning_of(trainer)
        tick = trainer.global_step
        if pruning.config.schedule_unit != "step" or tick in self._seen or not pruning.schedule.is_event(tick):
            return
        self._seen.add(tick)
        last = pruning.history[-1] if pruning.history and pruning.history[-1]["tick"] == tick else None
        mine = {
            "masks": digest(pruning.masks),
            "unit_masks": digest(pruning.unit_masks),
            "weights": digest(dict(pl_module.named_parameters())),
            "sparsity": pruning.current_sparsity(),
            "event": last,
            "initial_metric": pruning.controller.initial_metric,
            "full_val_metric": full_val_metric(trainer, pl_module) if pruning._has_val else None,
        }
        self.events.append({"tick": tick, "ranks": gather(mine)})

    def on_train_end(self, trainer, pl_module) -> None:
        pruning = pruning_of(trainer)
        quant = quantization_of(trainer)
        export = quant.export_path if quant is not None else None
        stats = pruning.stats
        mine = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "global_step": trainer.global_step,
            "optimizer_steps": self.optimizer_steps,
            "backward_calls": self.backward_calls,
            "stats_count": stats.count if stats is not None else None,
            "stats_skipped": stats.skipped_steps if stats is not None else None,
            "stats": stats_digest(stats),
            "stats_finite": _stats_finite(stats),
            "masks": digest(pruning.masks),
            "weights": digest(dict(pl_module.named_parameters())),
            "sparsity": pruning.current_sparsity(),
            "history": pruning.history,
            "precision": str(trainer.precision),
            "collectives": self.pre.collectives,
            "bits_used": getattr(quant, "bits_used", None),
            # the export must be complete on every rank when the quantization callback's on_train_end returns
            "export_ready": bool(export) and Path(export).is_file(),
        }
        final = gather(mine)
        record = {"pre": self.pre.records, "events": self.events, "final": final}
        out = Path(self.out_dir)
        if trainer.is_global_zero:
            torch.save({"masks": pruning.masks, "state_dict": pl_module.state_dict()}, out / f"{self.tag}.pt")
        (out / f"{self.tag}.rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.audit and stage == "fit":
            path = Path(self.out_dir) / f"{self.tag}.writes.rank{trainer.global_rank}.json"
            writes = list(_AUDIT["writes"])
            _AUDIT["root"] = None
            path.write_text(json.dumps(writes))


def _stats_finite(stats: Any) -> bool | None:
    if stats is None:
        return None
    values = []
    if stats.per_weight:
        values += stats.weight_mean() + stats.weight_std()
    if stats.per_unit:
        values += stats.unit_rms_mean() + stats.unit_rms_std()
    return all(bool(torch.isfinite(v).all()) for v in values)


class GradSpy(Callback):
    """The gradient the optimizer uses (``on_before_optimizer_step``, listed before pruning) of one module, every
    step."""

    def __init__(self, out_dir: str | Path, tag: str, module_name: str = "net.1") -> None:
        self.out_dir, self.tag, self.module_name = str(out_dir), tag, module_name
        self.grads: list[Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(dict(pl_module.named_modules())[self.module_name].weight.grad.detach().double().clone())

    def on_train_end(self, trainer, pl_module) -> None:
        pruning = pruning_of(trainer)
        index = list(pruning.layers.modules).index(self.module_name)
        ref = torch.stack(self.grads[:: pruning.stats.weight_every])  # the steps the per-weight statistics sample
        mine = {
            "grads": digest(self.grads),
            "steps": len(self.grads),
            "mean_err": float((pruning.stats.weight_mean()[index].double() - ref.mean(0)).abs().max()),
            "std_err": float((pruning.stats.weight_std()[index].double() - ref.std(0, unbiased=False)).abs().max()),
            "ref_scale": float(ref.abs().max()),
        }
        everyone = gather(mine)
        path = Path(self.out_dir) / f"{self.tag}.spy.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(everyone))


# --------------------------------------------------------------------------- data with the single-process order
class _StridedEpochSampler(DistributedSampler):
    """``EpochSeededSampler``'s permutation of the epoch, dealt round-robin to the ranks: rank r takes positions
    r, r+W, r+2W, ... so that the W per-rank batches of step k hold exactly the samples of the single-process batch k
    of size W*B (as long as the batches are full)."""

    def __init__(self, size: int, seed: int, num_replicas: int, rank: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.num_replicas, self.rank = num_replicas, rank

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: len(self) * self.num_replicas - self.size]  # pad like DistributedSampler: equal batch counts
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return (self.size + self.num_replicas - 1) // self.num_replicas  # ceil(size / replicas)


class StridedDigits(DigitsDataModule):
    """Digits whose training order under DDP is the single-process order (Lightning leaves a DistributedSampler
    alone)."""

    def train_dataloader(self) -> DataLoader:
        dataset = self._splits["train"]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = _StridedEpochSampler(len(dataset), self.seed, world, rank)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)


# --------------------------------------------------------------------------- strategies the callbacks must refuse
class FSDPStrategy(_LightningFSDPStrategy):
    """Lightning's own ``FSDPStrategy`` under its own name. Lightning refuses ``type(s) is FSDPStrategy`` on CPU at
    ``Trainer(...)``, before any callback could; this subclass gets past that check to the callbacks' ``setup``
    (which runs before FSDP wraps the model, the step that needs a GPU)."""


class DeepSpeedStrategy(DDPStrategy):
    """Stand-in named like Lightning's ``DeepSpeedStrategy`` (which, like this one, subclasses ``DDPStrategy``, so an
    ``isinstance(strategy, DDPStrategy)`` check would wrongly accept it); ``deepspeed`` is not installed."""
