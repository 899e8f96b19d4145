"""An independent reference evaluation (plain torch, no lightning_compress code) used by several tests."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def accuracy_of(model: nn.Module, loader, average: str = "macro") -> float:
    """Macro-averaged (torchmetrics' MulticlassAccuracy default) or micro accuracy over ``loader``."""
    was_training = model.training
    model.eval()
    preds, targets = [], []
    for x, y in loader:
        preds.append(model(x).argmax(-1))
        targets.append(y)
    model.train(was_training)
    pred, target = torch.cat(preds), torch.cat(targets)
    if average == "micro":
        return float((pred == target).float().mean())
    classes = torch.unique(target)
    return float(torch.stack([(pred[target == c] == c).float().mean() for c in classes]).mean())
