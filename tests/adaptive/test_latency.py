"""ONNX Runtime latency (adaptive/latency.py): the table's arithmetic, the layer shapes it times, and measurements."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress.adaptive.latency import (
    LatencyTable,
    build_table,
    layer_inputs,
    measure,
    measured_ratio,
    resized_layer,
)


def test_table_combines_rows_separably_and_predicts_both_ways() -> None:
    table = LatencyTable(full={"a": (8, 4), "b": (2, 8)}, dense=10.0)
    table.times = {"a": {(8, 4): 4.0, (4, 4): 2.0, (8, 2): 3.0}, "b": {(2, 8): 4.0, (2, 4): 1.0}}
    assert table.time("a", 4, 2) == pytest.approx(2.0 * 3.0 / 4.0)  # T(out, full) * T(full, in) / T(full, full)
    assert table.time("a", 8, 2) == 3.0  # measured entries are taken as they are
    assert table.rest == pytest.approx(2.0)
    sizes = {"a": (4, 4), "b": (2, 4)}
    assert table.predict(sizes, "additive") == pytest.approx(2.0 + 2.0 + 1.0)
    assert table.predict(sizes, "scaled") == pytest.approx(10.0 * 3.0 / 8.0)
    assert table.predict({}) == pytest.approx(10.0)  # the dense plan predicts the dense measurement


def test_layer_inputs_and_resized_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    assert layer_inputs(model, (2, 3, 8, 8)) == {"0": (2, 3, 8, 8), "3": (2, 128)}
    conv = resized_layer(model[0], 5, 2)
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (5, 2, 3, 3) and conv.stride == (2, 2)
    assert resized_layer(model[3], 4, 7).weight.shape == (4, 7)
    with pytest.raises(ValueError, match="groups=2"):
        resized_layer(nn.Conv2d(4, 4, 3, groups=2), 2, 2)


def test_a_wider_layer_measures_slower_and_the_table_holds_what_was_asked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    shape = (8, 1, 16, 16)
    table = build_table(model, shape, 1, outputs={"0": [64, 16]}, inputs={"2": [64, 16]})
    assert table.full == {"0": (64, 1), "2": (64, 64)}
    assert set(table.times["0"]) == {(64, 1), (16, 1)} and set(table.times["2"]) == {(64, 64), (64, 16)}
    assert table.graphs == 4 and table.dense > 0
    assert table.times["2"][(64, 16)] < table.times["2"][(64, 64)]  # 4x fewer MACs: clearly faster
    narrow = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, padding=1))
    ratio, dense, seconds = measured_ratio(model, narrow, shape, 1)
    assert ratio == pytest.approx(seconds / dense) and ratio < 0.8
    assert set(measure({}, {}, 1)) == set()


def test_int8_rows_and_the_int8_model_predict_a_plan() -> None:
    table = LatencyTable(full={"a": (8, 4), "b": (2, 8)}, dense=10.0)
    table.times = {"a": {(8, 4): 4.0, (4, 4): 2.0}, "b": {(2, 8): 4.0, (2, 4): 1.0}}
    table.int8 = {"a": {(8, 4): 1.0, (4, 4): 0.6}, "b": {(2, 8): 2.0, (2, 4): 0.5}}
    table.int8_models = {frozenset({"a", "b"}): 6.0}
    assert table.time("a", 4, 4, int8=True) == 0.6 and table.time("a", 4, 4) == 2.0
    sizes = {"a": (4, 4), "b": (2, 4)}
    assert table.predict(sizes, int8={"a", "b"}) == pytest.approx(6.0 * (0.6 + 0.5) / (1.0 + 2.0))  # measured set
    assert table.predict(sizes, int8={"a"}) == pytest.approx(10.0 * (0.6 + 1.0) / 8.0)  # a set not measured whole
    assert table.predict(sizes, "additive", int8={"a"}) == pytest.approx(2.0 + 0.6 + 1.0)


def test_build_table_times_every_row_at_int8_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    table = build_table(model, (16, 1, 8, 8), 1, outputs={"0": [16, 8]}, inputs={"2": [16, 8]}, int8=True)
    assert set(table.int8) == {"0", "2", "5"}  # every layer has an integer form (QLinearConv / QGemm)
    assert all(set(table.int8[n]) == set(table.times[n]) for n in table.int8)  # the same rows, at int8
    assert all(v > 0 for rows in table.int8.values() for v in rows.values())
    assert table.graphs == 2 * (2 + 2 + 1)
    assert frozenset({"0", "2", "5"}) in table.int8_models  # the dense model with every int8 layer, timed whole
    faster = {n for n in table.int8 if table.int8[n][table.full[n]] < table.times[n][table.full[n]]}
    assert set(table.int8_models) == {s for s in (frozenset({"0", "2", "5"}), frozenset(faster)) if s}


def test_measure_holds_only_one_group_of_sessions_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session keeps its buffers while it lives: the graphs are timed in groups within SESSION_BYTES, each group's
    sessions gone before the next group's are made (the first graph timed again in each), every graph timed."""
    import gc
    import weakref

    from lightning_compress.adaptive import latency

    shape = (4, 16)
    graph = latency.float_graph(nn.Linear(16, 16).eval(), shape)
    per_graph = latency.BUFFERS * 4 * 4 * 16
    monkeypatch.setattr(latency, "SESSION_BYTES", 3 * per_graph)  # three graphs per group
    alive: list[weakref.ref[object]] = []
    most = 0
    real = latency.session

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal most
        gc.collect()
        live = [ref for ref in alive if ref() is not None]
        made = real(*args, **kwargs)  # type: ignore[arg-type]
        alive.append(weakref.ref(made))
        most = max(most, len(live) + 1)
        return made

    monkeypatch.setattr(latency, "session", counted)
    names = [f"g{i}" for i in range(7)]
    seconds = latency.measure(dict.fromkeys(names, graph), dict.fromkeys(names, shape), threads=1, rounds=1, warmup=0)
    assert set(seconds) == set(names) and all(value > 0 for value in seconds.values())
    assert most == 4  # 7 graphs in groups of 3, 3, 1, the first graph timed again in each later one
    assert latency._groups(dict.fromkeys(names, shape), names) == [names[:3], names[3:6], names[6:]]
    assert latency._groups({"big": (1 << 30,)}, ["big"]) == [["big"]]  # larger than the cap: a group of its own
    rows = ["a:1x1", "a:1x1:int8", "a:2x1", "b:1x1", "b:1x1:int8", "<model>"]  # a layer's rows stay together
    assert latency._groups(dict.fromkeys(rows, shape), rows) == [rows[:3], rows[3:]]


def test_load_that_changes_between_groups_is_scaled_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in sessions of equal cost, the machine 1.5x slower from the second group on: scaled by the first graph
    timed in both groups, every graph reads alike."""
    import time

    from lightning_compress.adaptive import latency

    made = 0

    class Slow:
        def __init__(self) -> None:
            nonlocal made
            made += 1
            self.load = 1.0 if made <= 2 else 1.5  # the first group's two sessions, then a loaded machine

        def get_inputs(self) -> list[Any]:
            return [type("Input", (), {"name": "x"})()]

        def run(self, _: Any, feed: Any) -> None:
            end = time.thread_time() + 0.004 * self.load
            while time.thread_time() < end:
                pass

    monkeypatch.setattr(latency, "session", lambda *args, **kwargs: Slow())
    monkeypatch.setattr(latency, "SESSION_BYTES", 2 * latency.BUFFERS * 4 * 4)
    names = ["a", "b", "c", "d"]
    seconds = latency.measure(dict.fromkeys(names, b""), dict.fromkeys(names, (4,)), threads=1, rounds=3, warmup=0)
    assert max(seconds.values()) / min(seconds.values()) < 1.2, seconds  # unscaled, c and d would read 1.5x
