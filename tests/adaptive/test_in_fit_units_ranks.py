"""Under DDP only rank zero times ONNX Runtime graphs and solves the latency plan (review finding 10, DDP bullet):
the plan and the delivered ratio are rank zero's (broadcast), so the other ranks' tables, compacted-copy timings
and end-of-fit timing were work thrown away, and timing on the same CPUs at once made rank zero's noisier. The
rank stands in here (the 2-process fit is test_in_fit_units.py's DDP test)."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.adaptive import in_fit_units, unit_planner
from lightning_compress.adaptive.in_fit_units import LatencyPlanner, verify
from tests.adaptive.test_in_fit_units_gate import _run


def _never(*_: object, **__: object) -> None:
    raise AssertionError("timed on a rank other than zero")


def test_a_rank_other_than_zero_scores_the_units_and_times_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *_: 1)
    for module in (unit_planner, in_fit_units):
        monkeypatch.setattr(module, "float_graph", _never)
    monkeypatch.setattr(unit_planner, "build_table", _never)
    monkeypatch.setattr(in_fit_units, "measure", _never)
    run, model, _ = _run()
    planner = LatencyPlanner(model, 0.6, (2, 1, 6, 6), 1)
    sent: list[object] = []
    rank_zeros = [(None, None), ({"0": 6, "3": 5}, None), ({"0": 4, "3": 3}, None), ((0.5, "rank zero's"), None)]
    planner.share = lambda pair: (sent.append(pair), rank_zeros.pop(0))[1]  # the broadcast: rank zero's values
    fisher = dict(zip(run.stats.names, run.stats.unit_taylor_second_moment()))
    for final, plan in ((False, {"0": 6, "3": 5}), (True, {"0": 4, "3": 3})):
        assert planner(run.layers.names, run.state.groups, fisher, {}, final=final) == plan  # rank zero's, taken
    assert planner.problem is not None and set(planner.problem.members) == {"0", "3"}
    assert set(planner.problem.scores) == {"0", "3"}  # the masks of an event follow the scores on every rank
    assert verify(planner, model, planner.share) == 0.5  # rank zero's ratio, taken
    assert planner.dense_graph is None
    assert sent == [(None, None)] * 4  # this rank sent nothing of its own to the broadcasts
