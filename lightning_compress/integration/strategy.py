"""The training strategies the callbacks support, checked in ``setup`` before any step."""

from __future__ import annotations

import atexit

import lightning.pytorch as pl
import torch.distributed as dist

# Every rank holds whole parameters and (DDP) identical, all-reduced gradients. A user's subclass of these is
# accepted, unless it also derives from a strategy that shards parameters (Lightning's DeepSpeedStrategy is a
# DDPStrategy subclass); classes are compared by name, so no optional dependency has to be imported.
SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
SHARDING_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
_EXIT_HOOK_REGISTERED = False


def check_strategy(trainer: pl.Trainer, callback: str) -> None:
    """Refuse strategies that shard parameters (FSDP, DeepSpeed, model parallel, ...): each rank would see a
    slice of every weight, and statistics, masks or quantization parameters would be silently wrong."""
    lineage = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    if lineage.isdisjoint(SUPPORTED_STRATEGIES) or not lineage.isdisjoint(SHARDING_STRATEGIES):
        raise ValueError(
            f"{callback} supports the strategies {list(SUPPORTED_STRATEGIES)} and their subclasses (single device, "
            f"ddp, ddp_spawn, ddp_fork), got {type(trainer.strategy).__name__}: sharded parameters would give each "
            "rank a partial view of the weights"
        )


def destroy_gloo_group_at_exit() -> None:
    """Under ``ddp``/``ddp_spawn`` on CPU, destroy the gloo process group when the process exits, as Lightning
    already does for NCCL (``lightning.fabric.utilities.distributed._destroy_dist_connection``).

    Without it a gloo worker thread can still be releasing the last collective's tensors (the metric sync, an
    all-gather) when the interpreter finalizes; it then needs the GIL, cannot get it, and the C++ runtime aborts
    the rank with "terminate called without an active exception" (SIGABRT) after a fit that succeeded. Destroying
    the group joins those threads while the interpreter is still whole. Registered once; harmless if someone
    else destroys the group first."""
    global _EXIT_HOOK_REGISTERED  # noqa: PLW0603 - a deliberate per-process flag: register the hook once
    if _EXIT_HOOK_REGISTERED or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() != "gloo":
        return
    atexit.register(_destroy_default_group)
    _EXIT_HOOK_REGISTERED = True


def _destroy_default_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_reparametrization(trainer: pl.Trainer, pl_module: pl.LightningModule, callback: str) -> None:
    """Refuse Lightning's ``ModelPruning`` in the same Trainer, and a model whose weights are re-parametrised
    (``torch.nn.utils.prune``: ``weight_orig`` / ``weight_mask``, or ``torch.nn.utils.parametrize``): such a
    ``.weight`` is recomputed from other tensors on every forward, so masks or quantized values written into it
    would be lost."""
    from lightning.pytorch.callbacks import ModelPruning

    if any(isinstance(other, ModelPruning) for other in trainer.callbacks):  # type: ignore[attr-defined]
        raise ValueError(
            f"{callback} cannot run in the same Trainer as Lightning's ModelPruning: ModelPruning re-parametrises "
            "the weights (`weight_orig` * `weight_mask`), so what lightning_compress writes into `.weight` would be "
            "recomputed away. Allowed: use GradientStabilityPruning for the pruning, or run ModelPruning in its own "
            "fit and make the pruning permanent (`make_pruning_permanent=True`) before compressing."
        )
    found = [
        name
        for name, module in pl_module.named_modules()
        if hasattr(module, "weight_orig") or getattr(module, "parametrizations", None) is not None
    ]
    if found:
        raise ValueError(
            f"{callback} cannot compress re-parametrised weights, found in {found[:5]}"
            f"{' ...' if len(found) > 5 else ''}: `torch.nn.utils.prune` (used by Lightning's ModelPruning) or "
            "`torch.nn.utils.parametrize`. Allowed: plain weights. Remove ModelPruning from the callbacks (or call "
            "`torch.nn.utils.prune.remove` / `parametrize.remove_parametrizations` first)."
        )


def check_compaction_launcher(trainer: pl.Trainer, callback: str) -> None:
    """Refuse compaction under a launcher that loads rank zero's final weights back into the main process's model
    (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``). That model was built at its full widths in the main process,
    where no callback runs, so nothing can compact it: after a fit that succeeded in the workers (artifacts
    written), Lightning's ``load_state_dict`` would fail on every compacted weight (a size mismatch), or leave the
    model you hold dense and stale. Checked in ``setup`` on every rank (the same decision on each), before any
    step."""
    from lightning_compress.integration._compat import returns_weights_to_main_process

    if returns_weights_to_main_process(trainer):
        raise ValueError(
            f"{callback} with compact=True cannot run under {type(trainer.strategy).__name__} launched in worker "
            "processes (strategy 'ddp_spawn', 'ddp_fork' or 'ddp_notebook'): Lightning loads rank zero's final "
            "weights back into the main process's model, which stays at its full widths (no callback runs there), "
            "so the compacted weights cannot be loaded into it. Allowed: strategy='ddp' (each process keeps its "
            "compacted model; `load_compressed` rebuilds it from compressed.ckpt anywhere), or compact=False"
        )
