"""2-process DDP fits with ``AdaptiveCompression`` for ``tests/callbacks/test_adaptive.py``.

Run as a script (``python tests/ddp/adaptive_scenarios.py SCENARIO OUT_DIR``, ``strategy="ddp"``): Lightning runs the
same command again for rank 1. Workers never assert: each rank writes what it delivered to
``OUT_DIR/<scenario>.rank<r>.json`` and the test compares.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
import torch

from lightning_compress import AdaptiveCompression, Budget
from lightning_compress.callbacks import adaptive_plan
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.quantization.carried import attach, carried
from tests.ddp.probes import digest
from tests.ddp.scenarios import model, trainer

compress_module = importlib.import_module("lightning_compress.adaptive.compress")  # the package exports the function

PERTURBED = 1000.0  # rank 1's Fisher of net.1 is scaled by 1 + this (rank 0's by 1): a stand-in for a backward
# that differs by rank (nondeterministic CUDA kernels), large enough that the two ranks' knapsacks choose apart


def _fisher_by_rank() -> None:
    real = compress_module.diagonal_fisher

    def ranked(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        fisher = real(*args, **kwargs)
        scale = 1.0 + PERTURBED * int(os.environ.get("LOCAL_RANK", "0"))
        return {name: f * scale if name == "net.1" else f for name, f in fisher.items()}

    compress_module.diagonal_fisher = ranked  # type: ignore[assignment]


def fisher(strategy: str, out: str) -> None:
    """The end-of-fit plan under a Fisher that differs by rank: both ranks must deliver rank zero's decisions."""
    _fisher_by_rank()
    _fit(strategy, out, "fisher")


def _fit(strategy: str, out: str, tag: str) -> None:
    pl.seed_everything(0)
    callback = AdaptiveCompression(budget=Budget(size=0.17, macs=0.5), max_metric_drop=0.2, method="rtn",
                                   export_path=str(Path(out) / f"{tag}.safetensors"), start_step=4, end_step=12,
                                   frequency=4)
    net = model()
    fit = trainer(strategy, [callback], out, max_epochs=3)
    fit.fit(net, DigitsDataModule(batch_size=64))
    record = carried(net)
    result = callback.result
    Path(out, f"{tag}.rank{fit.global_rank}.json").write_text(json.dumps({
        "plan": [row["label"] for row in result.plan], "file_bytes": result.file_bytes,
        "weights": digest(dict(net.state_dict())),
        "codes": digest({k: q.q for k, q in record.codes.items()}) if record is not None else None,
        "steps": result.steps, "metric_after": callback.report.metric_after}, sort_keys=True))


def _rank_one_apart() -> None:
    """After the end-of-fit plan, rank 1's delivered model moved (an output bias, one layer's codes): a stand-in for
    GPTQ's Hessians differing by rounding from rank to rank."""
    real = adaptive_plan.compress

    def apart(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = real(model, *args, **kwargs)
        if int(os.environ.get("LOCAL_RANK", "0")) == 1:
            with torch.no_grad():
                model.net[5].bias.add_(1e-3)
            record = carried(model)
            key = next(iter(record.codes))
            attach(model, {key: dataclasses.replace(record.codes[key], q=record.codes[key].q.flip(0))}, record.source)
        return result

    adaptive_plan.compress = apart  # type: ignore[assignment]


def apart(strategy: str, out: str) -> None:
    """Rank 1's delivered model moved after the plan: both ranks must end with rank zero's."""
    _rank_one_apart()
    _fit(strategy, out, "apart")


SCENARIOS: dict[str, Callable[[str, str], None]] = {"fisher": fisher, "apart": apart}

if __name__ == "__main__":  # strategy="ddp": Lightning runs this command again for rank 1
    torch.set_num_threads(1)
    SCENARIOS[sys.argv[1]]("ddp", sys.argv[2])
