"""A small MLP trained on sklearn's digits (the benchmarks' plain-torch loop, about a second), with train / validation
/ test splits, for the adaptive tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks._common import train as train_model
from lightning_compress.demos.data import load_digits_arrays


@dataclass
class Digits:
    model: nn.Module
    train: list[tuple[Tensor, Tensor]]  # batches of 64
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def accuracy(model: nn.Module, split: tuple[Tensor, Tensor]) -> float:
    with torch.no_grad():
        return float((model(split[0]).argmax(1) == split[1]).float().mean())


def trained_digits(hidden: tuple[int, ...] = (256, 128), epochs: int = 30, seed: int = 0) -> Digits:
    images, labels = load_digits_arrays()
    x, y = torch.from_numpy(images).reshape(len(images), -1), torch.from_numpy(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n = len(x)
    train, val, test = slice(0, n * 3 // 5), slice(n * 3 // 5, n * 4 // 5), slice(n * 4 // 5, n)
    torch.manual_seed(seed)
    widths = [64, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 10))
    xt, yt = x[train], y[train]
    batches = [(xt[i:i + 64], yt[i:i + 64]) for i in range(0, len(xt), 64)]
    train_model(model, batches, epochs=epochs, lr=3e-3)
    return Digits(model, batches, (x[val], y[val]), (x[test], y[test]))
