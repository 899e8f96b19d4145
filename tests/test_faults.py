"""Faults survived (issue 13): SIGKILL in the middle of an export, a full disk at export, a huge finite gradient,
and a callback instance reused for a second fit."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization, quantize
from lightning_compress.core import io
from lightning_compress.core.io import atomic_write, orphans
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.quantization import export
from lightning_compress.quantization.export import (
    check_same_run,
    load_float,
    load_quantized,
    save_quantized,
)
from lightning_compress.reporting.publish import RUNS_DIR
from tests.helpers import quiet_trainer


def _net(seed: int = 0, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 10))


def _quantized(seed: int = 0, width: int = 64) -> tuple[nn.Module, Any]:
    model = _net(seed, width)
    return model, quantize(model, bits=4)


# ---------------------------------------------------------------------------- SIGKILL mid-export
_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    from lightning_compress import quantize
    from lightning_compress.core.io import atomic_write
    from lightning_compress.quantization import export

    def half_then_hang(path, data):  # the real writer, stopped half-way through the bytes
        def write(handle):
            handle.write(data[: len(data) // 2])
            handle.flush()
            print("half written", flush=True)
            time.sleep(120)
        return atomic_write(path, write)

    export.write_bytes = half_then_hang
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 2048), nn.ReLU(), nn.Linear(2048, 10))  # ~70k codes: a 0.1 MB file
    export.save_quantized(model, quantize(model, bits=8), sys.argv[1])
""")


def test_sigkill_during_export_keeps_the_previous_file_and_the_next_export_removes_the_orphans(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    model, result = _quantized()
    save_quantized(model, result, path)
    previous = path.read_bytes()
    for _ in range(2):  # two killed exports: two orphans
        child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "half written"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        assert path.read_bytes() == previous
        assert torch.equal(load_quantized(_net(), path)[0].weight, model[0].weight)  # still loads, still the same
    assert len(orphans(path)) == 2 and all(p.stat().st_size > 0 for p in orphans(path))
    fresh, fresh_result = _quantized(seed=2)
    save_quantized(fresh, fresh_result, path)  # the next successful export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_quantized(_net(), path)[0].weight, fresh[0].weight)


def test_a_live_writers_temporary_file_is_not_an_orphan(tmp_path: Path) -> None:
    target = tmp_path / "m.safetensors"
    live = tmp_path / f".m.safetensors.{os.getppid()}.abc.tmp"  # the pytest runner's parent: alive
    dead = tmp_path / ".m.safetensors.999999999.abc.tmp"  # no such pid
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    assert orphans(target) == [dead]


def test_export_files_get_the_users_umask_not_0600(tmp_path: Path) -> None:
    model, result = _quantized()
    old = os.umask(0o022)
    try:
        path = save_quantized(model, result, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------- disk full at export
def _enospc_half_way(path: Any, data: bytes) -> Path:
    def write(handle: Any) -> None:
        handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))

    return atomic_write(path, write)


def test_disk_full_mid_write_keeps_the_previous_export_and_leaves_no_temporary_file(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    model, result = _quantized()
    save_quantized(model, result, path)
    previous = path.read_bytes()
    monkeypatch.setattr(export, "write_bytes", _enospc_half_way)
    other, other_result = _quantized(seed=3)
    with pytest.raises(OSError) as info:
        save_quantized(other, other_result, path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def _fit_with_export(tmp_path: Path, monkeypatch, fail: str, save_float_copy: bool = True):
    """A tiny fit whose export hits ENOSPC (``fail``: "export" = only the int file, "all" = every file)."""
    real = export.write_bytes

    def writer(path: Any, data: bytes) -> Path:
        if fail == "all" or not os.fspath(path).endswith(".fp32.safetensors"):
            return _enospc_half_way(path, data)
        return real(path, data)

    monkeypatch.setattr(export, "write_bytes", writer)
    callback = PostTrainingQuantization(bits=4, export_path=str(tmp_path / "m.safetensors"),
                                        save_float_copy=save_float_copy)
    torch.manual_seed(0)
    model = MLPClassifier(input_size=64, hidden=[16])
    trainer = quiet_trainer([callback], max_steps=4, limit_val_batches=2)
    with pytest.raises(OSError) as info:
        trainer.fit(model, DigitsDataModule(batch_size=64))
    assert info.value.errno == errno.ENOSPC
    return callback, model


@pytest.mark.parametrize("save_float_copy", [True, False])
def test_disk_full_at_export_leaves_the_trained_float_model_in_memory(tmp_path: Path, monkeypatch,
                                                                      save_float_copy: bool) -> None:
    callback, model = _fit_with_export(tmp_path, monkeypatch, "export", save_float_copy)
    modules = dict(model.named_modules())
    assert callback.float_weights  # the trained weights, captured before quantizing
    for name, weight in callback.float_weights.items():
        assert torch.equal(modules[name].weight.detach().cpu(), weight), name  # float again, not quantized
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == (["m.fp32.safetensors"] if save_float_copy else [])  # no partial export, no temporary file


def test_disk_full_at_export_leaves_a_loadable_float_copy_on_disk(tmp_path: Path, monkeypatch) -> None:
    _callback, model = _fit_with_export(tmp_path, monkeypatch, "export")
    reloaded = load_float(MLPClassifier(input_size=64, hidden=[16]), tmp_path / "m.fp32.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_disk_full_for_the_float_copy_too_still_leaves_the_model_float(tmp_path: Path, monkeypatch) -> None:
    callback, model = _fit_with_export(tmp_path, monkeypatch, "all")
    modules = dict(model.named_modules())
    for name, weight in callback.float_weights.items():
        assert torch.equal(modules[name].weight.detach().cpu(), weight), name
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []


# ---------------------------------------------------------------------------- disk full: the report names the file
def _full_disk(path: Any, data: bytes) -> Path:
    """The one atomic writer, its ``write()`` failing as a full disk does: errno 28 and no file named."""
    def write(handle: Any) -> None:
        handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return atomic_write(path, write)


def _pruned_then_exported(root: Path) -> pl.Trainer:
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=2, evaluate=False)
    quantization = PostTrainingQuantization(bits=4, export_path="m.safetensors", save_float_copy=False)
    torch.manual_seed(0)
    return quiet_trainer([pruning, quantization], max_steps=4, limit_val_batches=2, default_root_dir=root)


def _report_in(root: Path) -> dict[str, Any]:
    (path,) = root.rglob("compression_report.json")
    return json.loads(path.read_text())


def test_disk_full_at_export_names_the_file_and_the_report_keeps_the_pruning_history(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    monkeypatch.setattr(export, "write_bytes", _full_disk)
    trainer = _pruned_then_exported(tmp_path)
    with pytest.raises(OSError, match=r"No space left on device: '.*m\.safetensors'") as info:
        trainer.fit(MLPClassifier(input_size=64, hidden=[16]), DigitsDataModule(batch_size=64))
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("m.safetensors")
    report = _report_in(tmp_path)
    assert "m.safetensors" in report["failure"] and "No space left on device" in report["failure"]
    assert report["events"][0]["kind"] == "prune" and report["events"][0]["accepted"]  # the pruning history
    assert "compressed_checkpoint" not in report["files"] and not list(tmp_path.rglob("*.ckpt"))
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("m.safetensors"))


def test_disk_full_at_the_compressed_checkpoint_names_it_after_the_report_is_written(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    trainer = _pruned_then_exported(tmp_path)

    def full_disk(checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.strategy.checkpoint_io, "save_checkpoint", full_disk)
    with pytest.raises(OSError, match=r"No space left on device: '.*compressed\.ckpt'") as info:
        trainer.fit(MLPClassifier(input_size=64, hidden=[16]), DigitsDataModule(batch_size=64))
    assert info.value.errno == errno.ENOSPC
    report = _report_in(tmp_path)
    assert "compressed.ckpt" in report["failure"] and "compressed_checkpoint" not in report["files"]
    assert report["files"]["quantized"]["bytes"] > 0  # the export before it was written, and is listed
    assert [e["kind"] for e in report["events"]] == ["prune", "quantize"]


# ---------------------------------------------------------------------------- export and float copy of one run
def test_export_and_float_copy_of_different_runs_are_told_apart(tmp_path: Path) -> None:
    model, result = _quantized()
    export.save_float(model, tmp_path / "m.fp32.safetensors", run_id="run-1")
    save_quantized(model, result, tmp_path / "m.safetensors", run_id="run-1")
    assert check_same_run(tmp_path / "m.safetensors", tmp_path / "m.fp32.safetensors") == "run-1"
    later, later_result = _quantized(seed=5)
    save_quantized(later, later_result, tmp_path / "m.safetensors")  # a later run that wrote no float copy
    with pytest.raises(ValueError, match=r"not written by the same run"):
        check_same_run(tmp_path / "m.safetensors", tmp_path / "m.fp32.safetensors")
    with pytest.raises(ValueError, match=r"run_id '[0-9a-f]{32}' is not the expected 'run-1'"):
        load_quantized(_net(), tmp_path / "m.safetensors", expect_run="run-1")


def test_the_callbacks_export_and_float_copy_share_a_run_id(tmp_path: Path) -> None:
    callback = PostTrainingQuantization(bits=4, export_path=str(tmp_path / "m.safetensors"))
    quiet_trainer([callback], max_steps=2, limit_val_batches=1).fit(MLPClassifier(input_size=64, hidden=[16]),
                                                                    DigitsDataModule(batch_size=64))
    check_same_run(tmp_path / "m.safetensors", tmp_path / "m.fp32.safetensors")


# ---------------------------------------------------------------------------- a huge but finite gradient
class _HugeGradientOnce(pl.Callback):
    """At one step, multiplies every gradient by 1e30 before the pruning callback reads them (finite in float32),
    and divides it out again before the optimizer sees it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.mul_(1e30)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.div_(1e30)


def test_a_huge_finite_gradient_in_a_fit_leaves_finite_statistics() -> None:
    pruning = GradientStabilityPruning(sparsity=0.5, schedule="one_shot", start_step=6, evaluate=False,
                                       statistics="per_weight")
    torch.manual_seed(0)
    trainer = quiet_trainer([_HugeGradientOnce(step=2), pruning], max_steps=6, limit_val_batches=0)
    trainer.fit(MLPClassifier(input_size=64, hidden=[16]), DigitsDataModule(batch_size=64))
    assert pruning.stats is not None and pruning.stats.skipped_steps == 1 and pruning.stats.count == 5
    assert all(bool(t.isfinite().all()) for t in pruning.stats.weight_std() + pruning.stats.weight_mean())
    assert 0.45 <= pruning.weight_sparsity() <= 0.55  # the event ran on finite scores


# ---------------------------------------------------------------------------- one callback instance, two fits
def test_a_pruning_callback_reused_for_a_second_fit_starts_afresh() -> None:
    pruning = GradientStabilityPruning(sparsity=0.6, schedule="one_shot", start_step=3, evaluate=False)
    first, second = MLPClassifier(input_size=64, hidden=[16]), MLPClassifier(input_size=64, hidden=[16])
    quiet_trainer([pruning], max_steps=4, limit_val_batches=0).fit(first, DigitsDataModule(batch_size=64))
    first_masks = {k: v.clone() for k, v in pruning.masks.items()}
    first_report, first_stats = pruning.report, pruning.stats
    quiet_trainer([pruning], max_steps=4, limit_val_batches=0).fit(second, DigitsDataModule(batch_size=64))
    assert pruning.report is not first_report and len([e for e in pruning.report.events if e.kind == "prune"]) == 1
    assert pruning.stats is not first_stats and pruning.stats is not None
    assert pruning.stats.count == 3  # the second fit's steps up to its event (then the schedule is done)
    assert any(not torch.equal(pruning.masks[k], first_masks[k]) for k in first_masks)  # masks of the second model
    zeros = sum(int((m.weight == 0).sum()) for m in second.modules() if isinstance(m, nn.Linear))
    total = sum(m.weight.numel() for m in second.modules() if isinstance(m, nn.Linear))
    assert zeros / total == pytest.approx(0.6, abs=0.02)


def test_a_quantization_callback_reused_for_a_second_fit_exports_the_second_model(tmp_path: Path) -> None:
    callback = PostTrainingQuantization(bits=4, export_path="m.safetensors")  # relative: in each run's log dir
    models, exports = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(MLPClassifier(input_size=64, hidden=[16]))
        trainer = quiet_trainer([callback], max_steps=2, limit_val_batches=1, default_root_dir=tmp_path / str(seed))
        trainer.fit(models[-1], DigitsDataModule(batch_size=64))
        exports.append(Path(callback.report.files["quantized"]))
    run = Path(RUNS_DIR) / "run_0"  # no logger: a fresh directory of each run under its default_root_dir
    assert exports == [tmp_path / "0" / run / "m.safetensors", tmp_path / "1" / run / "m.safetensors"]
    loaded = load_quantized(MLPClassifier(input_size=64, hidden=[16]), exports[1])
    assert all(torch.equal(v, models[1].state_dict()[k]) for k, v in loaded.state_dict().items())
    assert len([e for e in callback.report.events if e.kind == "quantize"]) == 1
    assert set(callback.float_weights) == {n for n, m in models[1].named_modules() if isinstance(m, nn.Linear)}


def test_io_module_is_what_export_writes_through() -> None:
    assert export.write_bytes is io.write_bytes  # fsync, umask, orphan cleanup apply to exports
