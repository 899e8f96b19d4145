"""``callbacks/adaptive_plan.py`` without a Trainer: which batches a plan takes (never the fit's loader mid-fit
when the fit fed some), and what :class:`SeenBatches` keeps."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from lightning_compress.adaptive.session import BudgetError
from lightning_compress.callbacks import adaptive_plan
from lightning_compress.callbacks.adaptive_plan import SeenBatches, calibration_batches


class _Loader:
    """Counts how often it was iterated."""

    def __init__(self, persistent: bool) -> None:
        self.persistent_workers, self.iterated = persistent, 0

    def __iter__(self) -> Any:
        self.iterated += 1
        return iter([torch.full((2,), 7.0)] * 3)


def _trainer(loader: _Loader) -> Any:
    strategy = types.SimpleNamespace(broadcast=lambda obj, src=0: obj, batch_to_device=lambda b, device: b)
    return types.SimpleNamespace(train_dataloader=loader, strategy=strategy)


SEEN = [torch.zeros(2), torch.ones(2)]
# id, seen (None: the fit's loop is over), the loader's persistent_workers, batches expected (7: the loader's; None:
# refused), reads
ROWS = [
    ("mid_fit_seen", SEEN, True, [0.0, 1.0], 0),
    ("mid_fit_seen_not_persistent", SEEN, False, [0.0, 1.0], 0),
    ("mid_fit_nothing_seen_persistent", [], True, None, 0),  # refused, naming why (review 17)
    ("mid_fit_nothing_seen", [], False, [7.0, 7.0], 1),
    ("after_the_fit", None, True, [7.0, 7.0], 1),
]


@pytest.mark.parametrize(("seen", "persistent", "expected", "reads"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_the_batches_a_plan_takes(seen: list[Any] | None, persistent: bool, expected: list[float] | None,
                                  reads: int) -> None:
    loader = _Loader(persistent)
    module = types.SimpleNamespace(device=torch.device("cpu"))
    if expected is None:
        with pytest.raises(BudgetError, match="persistent workers"):
            calibration_batches(_trainer(loader), module, 2, seen)
    else:
        batches = calibration_batches(_trainer(loader), module, 2, seen)
        assert [float(b[0]) for b in batches] == expected
    assert loader.iterated == reads


def test_seen_batches_keep_the_first_count_on_cpu() -> None:
    seen = SeenBatches(2)
    for value in range(4):
        seen.add((torch.full((3,), float(value)), torch.tensor([value])))
    assert [int(b[1]) for b in seen.batches] == [0, 1]
    assert all(t.device.type == "cpu" for b in seen.batches for t in b)


def test_seen_batches_go_into_a_checkpoint_only_under_the_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = SeenBatches(2)
    for i in range(3):
        seen.add((torch.full((4, 8), float(i)), torch.zeros(4, dtype=torch.long)))
    state = seen.state()
    assert state is not None and len(state) == 2 and float(state[1][0][0, 0]) == 1.0
    monkeypatch.setattr(adaptive_plan, "SEEN_STATE_BYTES", 2 * (4 * 8 * 4 + 4 * 8) - 1)
    assert seen.state() is None
