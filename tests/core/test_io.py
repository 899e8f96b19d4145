"""The one atomic writer: the previous file survives a failed write, no temporary file is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_compress.core.io import atomic_write


def test_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    def explode(handle) -> None:
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, explode)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
