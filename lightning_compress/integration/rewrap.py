"""Re-wrap a DDP-wrapped model whose parameters changed in the middle of a fit.

``DistributedDataParallel`` takes the module's parameters once, when it wraps it (Lightning does so in
``strategy.setup``, after the callbacks' ``setup``): it all-reduces the gradients of those parameters only, through
hooks it registered on them then. A callback that adds parameters mid-fit (QAT's learnable scales, registered
through ``torch.nn.utils.parametrize`` when QAT starts) must wrap the module again, or the new parameters are
trained on every rank's own gradients and the ranks drift apart. Every rank calls it at the same step (wrapping is
a collective: rank zero's parameters and buffers are broadcast to the others).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel


def rewrap_ddp(trainer: pl.Trainer) -> bool:
    """Wrap ``trainer``'s LightningModule in a fresh ``DistributedDataParallel`` (the strategy's own settings and
    communication hook) so that it reduces the gradients of the parameters the module has now; the old wrapper's
    hooks go with it. False (nothing done) when the fit is not a DDP-wrapped one."""
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
        return False
    strategy.model = strategy.lightning_module
    strategy.configure_ddp()
    return True
