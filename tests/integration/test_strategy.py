"""The gloo process group is destroyed at interpreter exit (``_strategy.destroy_gloo_group_at_exit``).

Why it exists: a ``ddp_spawn`` rank aborted with SIGABRT after a successful fit, 3 times in 30 runs of
``test_ddp.py::test_metric_counts_each_validation_sample_once_when_the_set_does_not_split_evenly`` (0 in 50 with the
hook). Its core dump showed a gloo worker thread destroying an all-gather's work object, needing the GIL for a
tensor's Python object, while the main thread was already in ``Py_FinalizeEx``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import lightning_compress.integration.strategy as strategy_module

_CHILD = textwrap.dedent(
    """
    import atexit, os, sys
    import torch, torch.distributed as dist
    from lightning_compress.integration.strategy import destroy_gloo_group_at_exit

    # registered first, so it runs last (atexit is LIFO): it sees what the hook left
    atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    if sys.argv[2] == "hook":
        destroy_gloo_group_at_exit()
        destroy_gloo_group_at_exit()  # the second callback's setup: harmless
    out = [torch.empty(4)]
    dist.all_gather(out, torch.ones(4))
    print("gathered:", out[0].tolist(), flush=True)
    """
)


def _run_child(mode: str) -> str:
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    done = subprocess.run([sys.executable, "-c", _CHILD, str(find_free_network_port()), mode], capture_output=True,
                          text=True, timeout=120, check=False)  # the return code is asserted below, with stderr
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_gloo_group_is_destroyed_before_the_interpreter_finalizes() -> None:
    out = _run_child("hook")
    assert "gathered: [1.0, 1.0, 1.0, 1.0]" in out
    assert "initialized at exit: False" in out


def test_without_the_hook_the_group_outlives_the_exit_handlers() -> None:
    """The control: the check above could fail, because nothing else destroys a gloo group."""
    assert "initialized at exit: True" in _run_child("none")


def test_nothing_is_registered_without_a_process_group(monkeypatch) -> None:
    registered: list[object] = []
    monkeypatch.setattr(strategy_module.atexit, "register", registered.append)
    monkeypatch.setattr(strategy_module, "_EXIT_HOOK_REGISTERED", False)
    strategy_module.destroy_gloo_group_at_exit()
    assert registered == []


@pytest.mark.parametrize(
    ("strategy", "refused"),
    [("ddp_spawn", True), ("ddp_fork", True), ("ddp_notebook", True), ("ddp", False), ("auto", False)],
)
def test_compaction_is_refused_under_launchers_that_load_weights_back_into_the_main_process(strategy, refused) -> None:
    """``_compat.returns_weights_to_main_process`` against the installed Lightning: the spawn / fork launchers load
    rank zero's final state_dict into the main process's (full-width) model; ``ddp`` runs the script again."""
    import lightning.pytorch as pl

    from lightning_compress.integration._compat import returns_weights_to_main_process

    devices = 1 if strategy == "auto" else 2
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert returns_weights_to_main_process(trainer) is refused
    if refused:
        with pytest.raises(ValueError, match=r"Pruning\(x\) with compact=True cannot run under DDPStrategy launched "
                                             r"in worker processes.*Allowed: strategy='ddp'.*or compact=False"):
            strategy_module.check_compaction_launcher(trainer, "Pruning(x)")
    else:
        strategy_module.check_compaction_launcher(trainer, "Pruning(x)")
