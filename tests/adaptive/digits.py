"""A small MLP trained on sklearn's digits (plain torch loop, a few seconds), with train / validation / test splits,
shared by the adaptive tests and ``benchmarks/bench_adaptive.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

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
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = x[train], y[train]
    batches = [(xt[i:i + 64], yt[i:i + 64]) for i in range(0, len(xt), 64)]
    for _ in range(epochs):
        for bx, by in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(bx), by).backward()
            optimizer.step()
    model.eval()
    return Digits(model, batches, (x[val], y[val]), (x[test], y[test]))
