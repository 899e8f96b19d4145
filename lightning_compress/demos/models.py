"""Small example classifiers used by the default job, the examples, the tests and the benchmarks.

They follow the one convention the callbacks rely on for evaluation: a batch is ``(inputs, targets)`` and
``model(inputs)`` returns logits. (A LightningModule with another batch layout defines
``compression_step(batch) -> (preds, targets)``; see ``lightning_compress.integration.evaluation``.)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.core.validation import check_number


class _Classifier(pl.LightningModule):
    """Cross-entropy training, validation accuracy logged as ``val_acc``, Adam(W) optimizer."""

    net: nn.Module

    def __init__(self, num_classes: int, lr: float, weight_decay: float) -> None:
        super().__init__()
        check_number("num_classes", num_classes, low=2, integer=True)
        check_number("lr", lr, low=0, low_inclusive=False)
        check_number("weight_decay", weight_decay, low=0)
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes)
        self.save_hyperparameters()  # the subclass's arguments too: Lightning collects every __init__ frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class MLPClassifier(_Classifier):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear. ``input_size`` is H*W*C (64 for digits, 784 for MNIST)."""

    def __init__(self, input_size: int = 784, hidden: list[int] | None = None, num_classes: int = 10,
                 lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(num_classes, lr, weight_decay)
        check_number("input_size", input_size, low=1, integer=True)
        hidden = _widths("hidden", hidden, [256, 128])
        layers: list[nn.Module] = [nn.Flatten()]
        widths = [input_size, *hidden]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)
        self.example_input_array = torch.zeros(2, input_size)


class SmallCNN(_Classifier):
    """Two conv blocks (conv -> BN -> ReLU -> maxpool) and a two-layer head. Works on 8x8 and 28x28 inputs."""

    def __init__(
        self,
        image_size: int = 28,
        channels: list[int] | None = None,
        hidden: int = 64,
        num_classes: int = 10,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay)
        check_number("image_size", image_size, low=4, integer=True)
        check_number("hidden", hidden, low=1, integer=True)
        c1, c2 = _widths("channels", channels, [16, 32], count=2)
        side = image_size // 4  # two 2x2 max-pools
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        self.example_input_array = torch.zeros(2, 1, image_size, image_size)


def _widths(argument: str, given: list[int] | None, default: list[int], count: int | None = None) -> list[int]:
    """Layer widths: ``default`` when not given; each a positive integer; exactly ``count`` of them if given."""
    widths = list(default if given is None else given)
    if count is not None and len(widths) != count:
        raise ValueError(f"`{argument}` must list {count} widths, got {given!r}")
    for width in widths:
        check_number(argument, width, low=1, integer=True)
    return widths
