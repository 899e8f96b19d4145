"""Small context managers shared by the modules that run a model outside training. No Lightning import."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards (a model may keep some
    submodules in eval on purpose, e.g. frozen BatchNorm, so one ``model.train(was_training)`` is not enough)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode
