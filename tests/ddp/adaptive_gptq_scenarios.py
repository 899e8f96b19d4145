"""2-process DDP fit with ``AdaptiveCompression(method="gptq")`` for ``tests/callbacks/test_adaptive_plan_ranks.py``.

Run as a script (``python tests/ddp/adaptive_gptq_scenarios.py gptq OUT_DIR``, ``strategy="ddp"``): Lightning runs
the same command again for rank 1. Workers never assert: each rank writes, right after its ``compress()`` call
(before the callback hands every rank rank zero's delivered model), how often it ran GPTQ and the Fisher's backward
passes, the method delivered and digests of its codes and weights, to ``OUT_DIR/gptq.rank<r>.json``; the test compares.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
import torch

from lightning_compress import AdaptiveCompression, Budget
from lightning_compress.adaptive import gptq_plan
from lightning_compress.callbacks import adaptive_plan
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.quantization.carried import carried
from tests.ddp.probes import digest
from tests.ddp.scenarios import model, trainer

compress_module = importlib.import_module("lightning_compress.adaptive.compress")  # the package exports the function


def gptq(strategy: str, out: str) -> None:
    calls = {"gptq_model": 0, "diagonal_fisher": 0}
    real_gptq, real_fisher = gptq_plan.gptq_model, compress_module.diagonal_fisher
    real_compress = adaptive_plan.compress

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["gptq_model"] += 1
        return real_gptq(*args, **kwargs)

    def fisher_counted(*args: Any, **kwargs: Any) -> Any:
        calls["diagonal_fisher"] += 1
        return real_fisher(*args, **kwargs)

    def recorded(net: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = real_compress(net, *args, **kwargs)
        record = carried(net)
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        Path(out, f"gptq.rank{rank}.json").write_text(json.dumps({
            "gptq_model_calls": calls["gptq_model"], "diagonal_fisher_calls": calls["diagonal_fisher"],
            "method": result.method, "steps": result.steps,
            "plan": [row["label"] for row in result.plan],
            "codes": digest({k: q.q for k, q in record.codes.items()}) if record is not None else None,
            "scales": digest({k: q.scale for k, q in record.codes.items()}) if record is not None else None,
            "weights": digest(dict(net.state_dict()))}, sort_keys=True))
        return result

    gptq_plan.gptq_model = counted  # type: ignore[assignment]
    compress_module.diagonal_fisher = fisher_counted
    adaptive_plan.compress = recorded  # type: ignore[assignment]
    pl.seed_everything(0)
    callback = AdaptiveCompression(budget=Budget(size=0.17), method="gptq", start_step=4, end_step=12, frequency=4)
    trainer(strategy, [callback], out, max_epochs=3).fit(model(), DigitsDataModule(batch_size=64))


if __name__ == "__main__":  # strategy="ddp": Lightning runs this command again for rank 1
    torch.set_num_threads(1)
    {"gptq": gptq}[sys.argv[1]]("ddp", sys.argv[2])
