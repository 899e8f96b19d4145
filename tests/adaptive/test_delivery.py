"""write_within: the export measured before it lands, nothing at the path when over the cap or when the write
fails, and an outcome that survives pickling (what a broadcast does) with the error rebuilt on the other side."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from lightning_compress.adaptive.delivery import ExportOutcome, write_within
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.quantization.export import load_float


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _size(tmp_path: Path) -> int:
    outcome, error = write_within(_model(), tmp_path / "probe" / "m.safetensors", None, "probe")
    assert error is None and outcome.file_bytes is not None
    return outcome.file_bytes


def test_within_the_cap_the_file_is_written_and_its_size_is_the_one_measured(tmp_path: Path) -> None:
    model, path = _model(), tmp_path / "m.safetensors"
    size = _size(tmp_path)
    outcome, error = write_within(model, path, size, "cap")
    assert error is None and not outcome.failed and outcome.file_bytes == path.stat().st_size == size
    reloaded = load_float(_model(), path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_one_byte_over_the_cap_nothing_is_written_and_the_error_names_budget_bytes_and_nearest(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    size = _size(tmp_path)
    outcome, error = write_within(_model(), path, size - 1, "25MB", macs=123)
    assert outcome.failed and outcome.kind == "budget" and outcome.file_bytes == size
    assert isinstance(error, BudgetError) and error.smallest == (size, 123)
    assert f"size='25MB' ({size - 1} bytes)" in str(error) and f"measured {size} bytes" in str(error)
    assert f"nearest budget known to hold: size={size}" in str(error)
    assert not list(tmp_path.glob("m.safetensors*")) and not list(tmp_path.glob(".m.safetensors*"))


def test_a_write_that_fails_is_an_outcome_not_a_raise(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    outcome, error = write_within(_model(), tmp_path / "a_file" / "m.safetensors", None, "x")
    assert outcome.failed and outcome.kind == "os" and isinstance(error, OSError)


@pytest.mark.parametrize(("outcome", "error", "text"), [
    (ExportOutcome(10, "budget", "over", smallest=(10, None)), BudgetError, "over"),
    (ExportOutcome(None, "os", "full", os_error=(28, "No space left on device", "/x/m.safetensors")), OSError,
     "No space left on device"),
    (ExportOutcome(None, "KeyError", "'w'"), RuntimeError, "KeyError: 'w'"),
], ids=["budget", "os", "other"])
def test_the_outcome_survives_pickling_and_rebuilds_the_error(outcome: ExportOutcome, error: type[Exception],
                                                               text: str) -> None:
    received = pickle.loads(pickle.dumps(outcome))
    assert received == outcome and received.failed
    rebuilt = received.error()
    assert isinstance(rebuilt, error) and text in str(rebuilt)
    if isinstance(rebuilt, BudgetError):
        assert rebuilt.smallest == (10, None)
    if isinstance(rebuilt, OSError):
        assert rebuilt.errno == 28 and rebuilt.filename == "/x/m.safetensors"
