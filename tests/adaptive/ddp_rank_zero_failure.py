"""Two gloo processes (no Trainer) for ``tests/adaptive/test_in_fit_units_rank_errors.py``: rank-zero-only steps of
the latency path fail on rank zero alone (the latency table's ONNX export / timing, the end-of-fit export of the
served graph); every rank must end with an error. Run as a script: ``python ddp_rank_zero_failure.py OUT_DIR PORT``.
Each rank writes what each step ended with to ``OUT_DIR/rank<r>.json``; both then wait for the other's file, so a
rank left waiting in a broadcast shows as a missing file (not as a peer that exited under it)."""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_compress.adaptive import unit_planner
from lightning_compress.adaptive.in_fit_units import LatencyPlanner, verify
from lightning_compress.structure.dependency import find_unit_groups

SHAPE = (2, 1, 6, 6)
WAIT = 60.0  # seconds a rank waits for the other's outcome (the test's own limit is longer)


def _share(value: Any) -> Any:
    """What ``trainer.strategy.broadcast(value, src=0)`` does."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 3))


def _broken_export(*_: Any, **__: Any) -> Any:
    raise RuntimeError("stand-in: the ONNX export failed on this rank")


def _outcome(step: Any) -> str:
    try:
        step()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def rank(index: int, out: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=index, world_size=2,
                            timeout=datetime.timedelta(seconds=WAIT * 2))
    model = _model()
    if index == 0:
        unit_planner.build_table = _broken_export  # type: ignore[assignment]  # fails where only rank zero times
    planner = LatencyPlanner(model, 0.6, SHAPE, 1)
    planner.share = _share
    groups = find_unit_groups(model, torch.randn(*SHAPE))
    outcomes = {"table": _outcome(lambda: planner.build(["0", "2"], groups))}
    planner.problem = SimpleNamespace()  # type: ignore[assignment]  # the fit's problem, built
    planner.dense_graph = b"dense" if index == 0 else None  # rank zero kept it
    outcomes["served graph"] = _outcome(lambda: verify(planner, model, _share, serve=_broken_export))
    folder = Path(out)
    (folder / f"rank{index}.json").write_text(json.dumps(outcomes))
    deadline = time.monotonic() + WAIT
    while not (folder / f"rank{1 - index}.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, join=True)
