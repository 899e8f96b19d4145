"""2-process DDP fits with ``QuantizationAwareTraining`` for ``tests/callbacks/test_qat_ddp.py``.

Run as a script (``python tests/ddp/qat_scenarios.py SCENARIO OUT_DIR``, ``strategy="ddp"``): Lightning runs the
same command again for rank 1, so both ranks execute the scenario. Workers never assert: each rank writes what it
saw (codes, scales, latent weights, digests per epoch) to ``OUT_DIR/<tag>.rank<r>.json`` and the test compares.
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
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.nn.parallel import DistributedDataParallel

from lightning_compress import GradientStabilityPruning, QuantizationAwareTraining
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.quantization.carried import carried
from tests.ddp.probes import ARTIFACTS, digest
from tests.ddp.scenarios import model, trainer
from tests.helpers import StopAfterEpoch


class QATProbe(Callback):
    """Per training epoch: digests of the scales and of the latent weights, and the scales' gradients' digest
    after the backward of the epoch's last step (all-reduced gradients are equal on both ranks)."""

    def __init__(self, qat: QuantizationAwareTraining) -> None:
        self.qat = qat
        self.epochs: list[dict[str, Any]] = []
        self.grads: str | None = None
        self.wrapped_scales = False

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.qat.active:
            self.grads = digest([q.log_gain.grad for q in self.qat.quantizers.values()])
            wrapper = trainer.strategy.model
            if isinstance(wrapper, DistributedDataParallel):
                params = {id(p) for p in wrapper.parameters()}
                self.wrapped_scales = all(id(q.log_gain) in params for q in self.qat.quantizers.values()) and all(
                    id(q.log_scale) in params for q in self.qat.input_quantizers.values())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        entry: dict[str, Any] = {"epoch": trainer.current_epoch, "active": self.qat.active, "grads": self.grads}
        if self.qat.active:
            entry["scales"] = digest({n: q.effective_scale() for n, q in self.qat.quantizers.items()})
            entry["ranges"] = {n: list(q.state()) for n, q in self.qat.input_quantizers.items()}
        entry["weights"] = digest({k: v for k, v in pl_module.state_dict().items() if "scale" not in k})
        self.epochs.append(entry)


def _qat_fit(strategy: str, out_dir: str, tag: str, bits: int, pruning: GradientStabilityPruning | None,
             activations: str | None = None, extra: list[Callback] | None = None, ckpt_path: str | None = None,
             **kwargs: Any) -> None:
    """QAT from epoch 1 of 3 with an export (after ``pruning``, if given): codes, scales, latent weights, shapes
    (and the trained activation ranges with ``activations``). ``extra`` callbacks, ``ckpt_path`` to resume from and
    Trainer ``kwargs`` as given."""
    pl.seed_everything(3)
    artifacts = Path(out_dir) / ARTIFACTS / tag
    artifacts.mkdir(parents=True, exist_ok=True)
    qat = QuantizationAwareTraining(bits=bits, start=1, export_path=str(artifacts / "model.safetensors"),
                                    activations=activations)  # type: ignore[arg-type]
    probe = QATProbe(qat)
    fit = trainer(strategy, [qat, probe] + ([pruning] if pruning else []) + (extra or []), artifacts, max_epochs=3,
                  **kwargs)
    module = model()
    fit.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    assert qat.result is not None
    record = {
        "rank": fit.global_rank, "world_size": fit.world_size, "strategy": type(fit.strategy).__name__,
        "epochs": probe.epochs, "wrapped_scales": probe.wrapped_scales,
        "shapes": {k: list(v.shape) for k, v in module.state_dict().items() if k.endswith("weight")},
        "layers": {layer.key: {"q": layer.qtensor.q.flatten().tolist(), "scale": layer.qtensor.scale.flatten().tolist(),
                               "method": layer.method} for layer in qat.result.layers.values()},
        "export": str(artifacts / "model.safetensors"),
        "ranges": {k: list(v) for k, v in sorted((carried(module).activations if carried(module) else {}).items())},
    }
    (Path(out_dir) / f"{tag}.rank{fit.global_rank}.json").write_text(json.dumps(record))


def _compacting() -> GradientStabilityPruning:
    return GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, schedule="one_shot", start_step=10,
                                    evaluate=False)


def scenario_codes(strategy: str, out_dir: str) -> None:
    """int3 QAT alone, then int4 QAT after structured pruning compacted the model (when QAT started); that fit
    again stopped after epoch 1 (mid-QAT, compacted) with a checkpoint, and resumed from it (in this launch: the
    processes are started once)."""
    _qat_fit(strategy, out_dir, "codes", 3, None)
    _qat_fit(strategy, out_dir, "compact", 4, _compacting())
    checkpoints = Path(out_dir) / ARTIFACTS / "checkpoints"
    _qat_fit(strategy, out_dir, "compact_part", 4, _compacting(), enable_checkpointing=True,
             extra=[ModelCheckpoint(dirpath=checkpoints, save_last=True), StopAfterEpoch(1)])
    _qat_fit(strategy, out_dir, "compact_resumed", 4, _compacting(), ckpt_path=str(checkpoints / "last.ckpt"))


def scenario_activations(strategy: str, out_dir: str) -> None:
    """int4 weights and int8 activation ranges learned under DDP."""
    _qat_fit(strategy, out_dir, "activations", 4, None, activations="int8")


SCENARIOS = {"codes": scenario_codes, "activations": scenario_activations}


if __name__ == "__main__":  # strategy="ddp": Lightning runs this command again for rank 1
    torch.set_num_threads(1)
    name, out = sys.argv[1], sys.argv[2]
    SCENARIOS[name]("ddp", out)
