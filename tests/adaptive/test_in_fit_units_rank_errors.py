"""Under DDP the latency path's rank-zero-only steps (the latency table's export and timings, the plan solved and
measured at the last event, the end-of-fit timing of the compacted / served graph, the int8 step's timings) raise on
every rank when they fail on rank zero (review 9 finding 6): before, rank zero raised alone and the other ranks
waited in the broadcast until the job was killed. Ranks stand in here (``torch.distributed`` patched, the broadcast
a plain function); the last test runs two gloo processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from lightning_compress.adaptive import latency, unit_planner
from lightning_compress.adaptive.in_fit import RankZeroError, from_rank_zero
from lightning_compress.adaptive.in_fit_units import LatencyPlanner
from lightning_compress.adaptive.latency_caps import shared_timings
from tests.adaptive.test_in_fit_units_gate import _run


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *_: rank)


def _fails() -> Any:
    raise OSError("stand-in: no space left on device")


class _Broadcast:
    """The broadcast seen from one rank: records what this rank sent, hands back ``rank_zeros`` (rank zero's
    pair, or what this rank sent when None: rank zero's own broadcast)."""

    def __init__(self, rank_zeros: Any = None) -> None:
        self.sent: list[Any] = []
        self.rank_zeros = rank_zeros

    def __call__(self, pair: Any) -> Any:
        self.sent.append(pair)
        return pair if self.rank_zeros is None else self.rank_zeros


@pytest.mark.parametrize("rank, work, rank_zeros, raised, sent", [
    (0, lambda: 3, None, None, (3, None)),  # rank zero works and hands its value on
    (0, _fails, None, r"OSError.*no space", (None, "OSError: stand-in: no space left on device")),  # raised, heard
    (1, _fails, (7, None), None, (None, None)),  # another rank runs no work: rank zero's value
    (1, lambda: 3, (None, "OSError: disk"), r"RankZeroError.*the timing failed on rank zero.*OSError: disk",
     (None, None)),  # rank zero's failure raises here too
])
def test_rank_zeros_work_or_its_error_reaches_every_rank(monkeypatch: pytest.MonkeyPatch, rank: int, work: Any,
                                                         rank_zeros: Any, raised: str | None, sent: Any) -> None:
    _as_rank(monkeypatch, rank)
    share = _Broadcast(rank_zeros)
    if raised is None:
        value = from_rank_zero(share, work, "the timing")
        assert value == (rank_zeros or sent)[0]
    else:
        with pytest.raises(Exception) as info:
            from_rank_zero(share, work, "the timing")
        assert re.search(raised, f"{type(info.value).__name__}: {info.value}")
    assert share.sent == [sent]  # one broadcast, every rank: none is left waiting in it


def test_a_latency_table_that_fails_on_rank_zero_is_broadcast_before_it_raises(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank zero's export / timing of the table fails: the other ranks hear of it (they were waiting for the table)
    and raise too, naming rank zero's error."""
    monkeypatch.setattr(unit_planner, "build_table", lambda *_, **__: _fails())
    run, model, _ = _run()
    fisher = dict(zip(run.stats.names, run.stats.unit_taylor_second_moment()))
    heard = []
    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        planner = LatencyPlanner(model, 0.6, (2, 1, 6, 6), 1)
        planner.share = share = _Broadcast(None if rank == 0 else heard[0])
        with pytest.raises(OSError if rank == 0 else RankZeroError, match="no space left on device"):
            planner(run.layers.names, run.state.groups, fisher, {}, final=False)
        heard.extend(share.sent)
    assert heard == [(None, "OSError: stand-in: no space left on device"), (None, None)]


def test_the_int8_steps_timings_are_rank_zeros_without_replacing_the_library_function(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``shared_timings`` is an argument (``timings=``), not a swap of ``latency.measure`` while a block runs."""
    real = latency.measure
    seconds = {"dense": 2.0, "model": 1.0}
    monkeypatch.setattr(latency, "measure", lambda *_, **__: dict(seconds))
    stand_in = latency.measure
    graphs, shapes = {"dense": b"", "model": b""}, {"dense": (1,), "model": (1,)}
    _as_rank(monkeypatch, 0)
    timings = shared_timings(share := _Broadcast())
    assert timings(graphs, shapes, 1) == seconds and share.sent == [(seconds, None)]
    assert latency.measure is stand_in and real is not stand_in  # nothing swapped
    _as_rank(monkeypatch, 1)
    monkeypatch.setattr(latency, "measure", lambda *_, **__: pytest.fail("timed on rank 1"))
    assert shared_timings(_Broadcast(({"dense": 3.0, "model": 1.5}, None)))(graphs, shapes, 1)["model"] == 1.5
    with pytest.raises(RankZeroError, match=r"ONNX Runtime timing failed on rank zero.*Fail: ORT"):
        shared_timings(_Broadcast((None, "Fail: ORT")))(graphs, shapes, 1)


@pytest.mark.ddp
def test_two_processes_both_end_when_rank_zero_alone_fails(tmp_path: Path) -> None:
    """Two gloo processes: the table's export and the served graph's export fail on rank zero alone; both ranks
    end each step with an error (rank 1 quoting rank zero's), none waits in the broadcast."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    script = Path(__file__).with_name("ddp_rank_zero_failure.py")
    with (tmp_path / "run.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(find_free_network_port())],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log_tail = (tmp_path / "run.log").read_text()[-3000:]
    assert all((tmp_path / f"rank{r}.json").exists() for r in (0, 1)), log_tail  # a rank never got past a step
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for step in ("table", "served graph"):
        assert zero[step].startswith("RuntimeError: stand-in: the ONNX export failed"), zero
        assert one[step].startswith("RankZeroError") and "stand-in: the ONNX export failed" in one[step], one
