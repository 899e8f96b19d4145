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


def test_safetensors_header_is_read_without_the_tensors(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from lightning_compress.core.io import read_safetensors_header

    save_file({"w": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.int8)}, str(tmp_path / "t.safetensors"),
              metadata={"k": "v"})
    header = read_safetensors_header(tmp_path / "t.safetensors")
    assert header.metadata == {"k": "v"}
    assert {k: (e.dtype, e.shape, e.nbytes) for k, e in header.tensors.items()} == {
        "w": ("F32", (3, 4), 48), "b": ("I8", (2,), 2)}


def test_export_path_rules(tmp_path: Path) -> None:
    from lightning_compress.core.io import check_export_path

    assert check_export_path("m.safetensors", tmp_path / "run") == tmp_path / "run" / "m.safetensors"
    assert (tmp_path / "run").is_dir()  # created
    (tmp_path / "old.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"`export_path`='.*old.safetensors' already exists"):
        check_export_path(str(tmp_path / "old.safetensors"), tmp_path)
    with pytest.raises(ValueError, match=r"`export_path`='run' is an existing directory"):
        check_export_path("run", tmp_path)
    with pytest.raises(ValueError, match=r"`export_path`='/proc/nope/m.safetensors': its directory '/proc/nope' "
                                         r"cannot be created"):
        check_export_path("/proc/nope/m.safetensors", tmp_path)
