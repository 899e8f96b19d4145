"""2-process DDP scenarios on CPU for ``tests/callbacks/test_ddp.py``, and the ``strategy="ddp"`` entry point.

Each scenario is a plain function ``scenario(strategy, out_dir)`` that builds its trainers and calls ``fit``:

* ``strategy="ddp_spawn"``: the test calls it in the pytest process; Lightning spawns the 2 workers and pickles the
  trainer to them.
* ``strategy="ddp"``: the test runs this file as a script (``python tests/ddp/scenarios.py SCENARIO OUT_DIR``);
  Lightning re-runs the same command line for rank 1, so both ranks execute the scenario.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_compress import GradientStabilityPruning
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from tests.ddp.probes import (
    ARTIFACTS,
    DeepSpeedStrategy,
    FSDPStrategy,
    GradSpy,
    RankProbe,
    StridedDigits,
)
from tests.helpers import StopAfterEpoch


# --------------------------------------------------------------------------- scenarios
def model() -> MLPClassifier:
    return MLPClassifier(input_size=64, hidden=[64, 32])


def trainer(strategy: Any, callbacks: list[Callback], root: str | Path, **kwargs: Any) -> pl.Trainer:
    """``root``: ``default_root_dir``, where the compression report (rank zero) and checkpoints go."""
    defaults: dict[str, Any] = dict(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def pruning_with_rollbacks() -> GradientStabilityPruning:
    """A constant schedule aggressive enough that some events break the bound and are rolled back. ``gate_batches=0``
    (the full validation set after each event) keeps the metric checkable against the whole set's value; the
    sequential early stop has its own DDP scenario (``gate_per_step``)."""
    return GradientStabilityPruning(sparsity=0.97, schedule="constant", amount=0.6, start_step=10, frequency=10,
                                    max_metric_drop=0.05, on_violation="backoff", per_weight_every=1,
                                    gate_batches=0)


def scenario_main(strategy: str, out_dir: str) -> None:
    """Pruning with accepted and rolled-back events, then 2-bit quantization that falls back to float for the
    layers most sensitive (measured with the synced metric), and an export."""
    from lightning_compress.callbacks.quantization import PostTrainingQuantization

    pl.seed_everything(3)
    (Path(out_dir) / ARTIFACTS).mkdir(exist_ok=True)
    quant = PostTrainingQuantization(bits=2, granularity="per_channel", max_metric_drop=0.05,
                                     export_path=str(Path(out_dir) / ARTIFACTS / "model.safetensors"))
    probe = RankProbe(out_dir, "main", audit=True, slow_export_s=1.0)
    callbacks = probe.callbacks(pruning_with_rollbacks(), quant)
    trainer(strategy, callbacks, Path(out_dir) / ARTIFACTS, max_epochs=3).fit(model(), DigitsDataModule(batch_size=32))


def scenario_accumulate_bf16(strategy: str, out_dir: str) -> None:
    """Accumulation over 2 micro-batches and bf16 autocast: statistics of the 10 optimizer steps' synced gradients."""
    pl.seed_everything(5)
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=10, evaluate=False)
    probe = RankProbe(out_dir, "accum")
    callbacks = probe.callbacks(GradSpy(out_dir, "accum"), pruning)
    trainer(strategy, callbacks, out_dir, max_epochs=1, max_steps=10, accumulate_grad_batches=2,
            precision="bf16-mixed").fit(model(), DigitsDataModule(batch_size=16))


def scenario_odd_val(strategy: str, out_dir: str) -> None:
    """359 validation samples on 2 ranks: the metric must still count each exactly once."""
    pl.seed_everything(4)
    pruning = GradientStabilityPruning(sparsity=0.3, schedule="one_shot", start_step=10, evaluate=True)
    probe = RankProbe(out_dir, "oddval")
    trainer(strategy, probe.callbacks(pruning), out_dir, max_epochs=1, max_steps=10).fit(
        MLPClassifier(input_size=64, hidden=[64, 32], lr=1e-2), DigitsDataModule(batch_size=32, val_fraction=0.2)
    )


def _resume_fit(strategy: str, out_dir: str, tag: str, stop_after: int | None = None, ckpt: str | None = None) -> None:
    pl.seed_everything(7)
    pruning = GradientStabilityPruning(sparsity=0.8, schedule="polynomial", start_step=5, end_step=70, frequency=5,
                                       evaluate=False)
    probe = RankProbe(out_dir, tag)
    callbacks = probe.callbacks(pruning)
    if stop_after is not None:
        callbacks += [ModelCheckpoint(dirpath=Path(out_dir) / tag, save_last=True, every_n_epochs=1, save_top_k=-1),
                      StopAfterEpoch(stop_after)]
    fit = trainer(strategy, callbacks, Path(out_dir) / tag, max_epochs=4, enable_checkpointing=stop_after is not None)
    fit.fit(model(), DigitsDataModule(batch_size=32), ckpt_path=ckpt)


def scenario_resume(strategy: str, out_dir: str) -> None:
    """Uninterrupted, stopped after epoch 1 (steps 20-39 of the 5-70 ramp), and resumed from its last.ckpt."""
    _resume_fit(strategy, out_dir, "full")
    _resume_fit(strategy, out_dir, "part", stop_after=1)
    _resume_fit(strategy, out_dir, "resumed", ckpt=str(Path(out_dir) / "part" / "last.ckpt"))


def parity_pruning() -> GradientStabilityPruning:
    return GradientStabilityPruning(sparsity=0.8, schedule="polynomial", start_step=6, end_step=30, frequency=6,
                                    evaluate=False)


def parity_fit(strategy: Any, out_dir: str, tag: str, batch_size: int, devices: int, strided: bool = False) -> None:
    """36 steps of one epoch (every batch full in both layouts: 1,257 samples, 39 batches of 32)."""
    pl.seed_everything(11)
    probe = RankProbe(out_dir, tag)
    dm = (StridedDigits if strided else DigitsDataModule)(batch_size=batch_size)
    trainer(strategy, probe.callbacks(parity_pruning()), out_dir, devices=devices, max_epochs=1, max_steps=36).fit(
        model(), dm
    )


def scenario_parity(strategy: str, out_dir: str) -> None:
    """Global batch 32 as 2 x 16: Lightning's sampler (its own order) and the single-process order."""
    parity_fit(strategy, out_dir, "ddp_default", batch_size=16, devices=2)
    parity_fit(strategy, out_dir, "ddp_strided", batch_size=16, devices=2, strided=True)


def scenario_refuse(strategy: str, out_dir: str) -> None:
    """Each callback under FSDP and a DeepSpeed-named DDP strategy: the error, and how many steps ran before it."""
    from lightning_compress.callbacks.quantization import PostTrainingQuantization

    results = []
    for strategy_cls in (FSDPStrategy, DeepSpeedStrategy):
        for make in (GradientStabilityPruning, PostTrainingQuantization):
            callback = make()
            counter = _BatchCounter()
            outcome: dict[str, Any] = {"strategy": strategy_cls.__name__, "callback": type(callback).__name__}
            try:
                trainer(strategy_cls(), [counter, callback], out_dir, max_epochs=1, limit_train_batches=2,
                        limit_val_batches=2).fit(model(), DigitsDataModule(batch_size=32))
                outcome["error"] = None
            except Exception as err:  # recorded for the test to check
                outcome["error"] = f"{type(err).__name__}: {err}"
            outcome["batches"] = counter.batches
            results.append(outcome)
    rank = dist.get_rank() if dist.is_initialized() else 0
    (Path(out_dir) / f"refuse.rank{rank}.json").write_text(json.dumps(results, indent=1))


class _BatchCounter(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


def scenario_gate(strategy: str, out_dir: str) -> None:
    """The gate's cheaper evaluation under DDP: a seeded subset with the early stop (micro accuracy) and refused
    events aligned with validation, the validation loop's value reused as their "before"."""
    pl.seed_everything(3)
    pruning = GradientStabilityPruning(sparsity=0.97, schedule="constant", amount=0.6, start_step=10, frequency=10,
                                       max_metric_drop=0.05, metric_kwargs={"average": "micro"}, gate_batches=2,
                                       align_events=True)
    probe = RankProbe(out_dir, "gate")
    trainer(strategy, probe.callbacks(pruning), out_dir, max_epochs=3).fit(model(), DigitsDataModule(batch_size=32))


def scenario_gate_default(strategy: str, out_dir: str) -> None:
    """The gate's default under DDP: the default metric (macro accuracy) judged on the validation's own per-sample
    record (each rank its half, class weights from the all-reduced class counts), refused events included."""
    pl.seed_everything(3)
    pruning = GradientStabilityPruning(sparsity=0.97, schedule="constant", amount=0.6, start_step=10, frequency=10,
                                       max_metric_drop=0.05, align_events=True)
    probe = RankProbe(out_dir, "gate_default")
    trainer(strategy, probe.callbacks(pruning), out_dir, max_epochs=3).fit(model(), DigitsDataModule(batch_size=32))


def scenario_gate_per_step(strategy: str, out_dir: str) -> None:
    """An explicit per-step schedule under DDP (events between validations): each event's full "before" pass keeps
    each rank's per-sample record of its unpadded half, and the "after" pairs it on all-reduced sums."""
    pl.seed_everything(3)
    pruning = GradientStabilityPruning(sparsity=0.97, schedule="constant", amount=0.6, start_step=5, frequency=10,
                                       max_metric_drop=0.05)
    probe = RankProbe(out_dir, "gate_per_step")
    trainer(strategy, probe.callbacks(pruning), out_dir, max_epochs=3).fit(model(), DigitsDataModule(batch_size=32))


def scenario_gate_unequal_shards(strategy: str, out_dir: str) -> None:
    """``gate_per_step`` on 257 validation samples: the unpadded shards hold 129 and 128 samples, 5 and 4 batches
    of 32, so the paired "after" must run both ranks to the larger count (the shorter adds zeros) or it hangs. A bound
    of 0 makes some events read every sample (none can be accepted early: the interval never closes on 0)."""
    pl.seed_everything(3)
    pruning = GradientStabilityPruning(sparsity=0.97, schedule="constant", amount=0.6, start_step=5, frequency=10,
                                       max_metric_drop=0.0)
    probe = RankProbe(out_dir, "gate_unequal_shards")
    trainer(strategy, probe.callbacks(pruning), out_dir, max_epochs=2).fit(
        model(), DigitsDataModule(batch_size=32, val_fraction=0.143))


SCENARIOS = {
    "main": scenario_main,
    "gate": scenario_gate,
    "gate_default": scenario_gate_default,
    "gate_per_step": scenario_gate_per_step,
    "gate_unequal_shards": scenario_gate_unequal_shards,
    "accumulate_bf16": scenario_accumulate_bf16,
    "odd_val": scenario_odd_val,
    "resume": scenario_resume,
    "parity": scenario_parity,
    "refuse": scenario_refuse,
}


if __name__ == "__main__":  # strategy="ddp": Lightning runs this command again for rank 1
    torch.set_num_threads(1)
    name, out = sys.argv[1], sys.argv[2]
    SCENARIOS[name]("ddp", out)
