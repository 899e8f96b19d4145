"""The training strategies the callbacks support, checked in ``setup`` before any step."""

from __future__ import annotations

import lightning.pytorch as pl

# Every rank holds whole parameters and (DDP) identical, all-reduced gradients.
SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


def check_strategy(trainer: pl.Trainer, callback: str) -> None:
    """Refuse strategies that shard parameters (FSDP, DeepSpeed, model parallel, ...): each rank would see a
    slice of every weight, and statistics, masks or quantization parameters would be silently wrong."""
    strategy = type(trainer.strategy).__name__
    if strategy not in SUPPORTED_STRATEGIES:
        raise ValueError(
            f"{callback} supports the strategies {list(SUPPORTED_STRATEGIES)} (single device, ddp, ddp_spawn, "
            f"ddp_fork), got {strategy}: sharded parameters would give each rank a partial view of the weights"
        )
