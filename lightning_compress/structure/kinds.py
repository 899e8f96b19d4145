"""The vocabulary of the dependency analysis: which module types and torch functions it knows, and the tags it puts
on tensors (see :mod:`lightning_compress.structure.walk`). Pure PyTorch."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from math import gcd, prod

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.structure.attention import ATTENTION_TYPES

PRODUCER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FOLLOWER_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh,
    nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
POOL_MODULES = (
    (nn.MaxPool1d, 1), (nn.MaxPool2d, 2), (nn.MaxPool3d, 3), (nn.AvgPool1d, 1), (nn.AvgPool2d, 2), (nn.AvgPool3d, 3),
    (nn.AdaptiveAvgPool1d, 1), (nn.AdaptiveAvgPool2d, 2), (nn.AdaptiveAvgPool3d, 3),
    (nn.AdaptiveMaxPool1d, 1), (nn.AdaptiveMaxPool2d, 2), (nn.AdaptiveMaxPool3d, 3),
)  # fmt: skip
# modules recorded as one call (everything else is entered and its torch functions recorded)
OPAQUE_TYPES = (
    *PRODUCER_TYPES, *FOLLOWER_TYPES, *ATTENTION_TYPES, *ELEMENTWISE_MODULES, *(t for t, _ in POOL_MODULES),
    nn.Flatten, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.Embedding, nn.PReLU,
)  # fmt: skip
ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, torch.tanh, F.tanh,
    F.elu, F.selu, F.celu, F.hardtanh, F.hardswish, F.softsign, F.tanhshrink, F.hardshrink, F.softshrink,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout,
}  # fmt: skip
ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "double", "half",
                        "to", "type_as", "gelu"}
POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
}  # fmt: skip
ADD = ({operator.add, operator.sub, torch.add, torch.sub}, {"add", "sub", "add_", "sub_"})
SCALE = ({operator.mul, torch.mul, operator.truediv, torch.div}, {"mul", "mul_", "div", "div_"})
REDUCE = ({torch.mean, torch.sum, torch.amax}, {"mean", "sum", "amax"})
RESHAPE = ({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze},
            {"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"})
PERMUTE = ({torch.permute, torch.transpose}, {"permute", "transpose"})
MATMUL = ({torch.matmul, torch.bmm}, {"matmul", "bmm"})
SOFTMAX = ({F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}, {"softmax", "log_softmax"})
CAT = {torch.cat, torch.concat, torch.concatenate}


class Refused(Exception):
    """The operation at hand cannot be followed: every unit set it touches becomes unprunable."""


class Space:
    """One set of units (union-find node: residual adds and attention merge sets). ``num_units`` counts the units
    of one *part* (attention modules: q, k and v are three parts sharing their units); units go in ``block`` s."""

    def __init__(self, producer: str, num_units: int, parts: int = 1, block: int = 1) -> None:
        self.parent, self.num_units, self.parts, self.block = self, num_units, parts, block
        self.producers, self.followers, self.reasons = [producer], [], []  # type: list[str], list[str], list[str]
        self.consumers: list[tuple[str, int, int]] = []
        self.attention_macs = 0.0  # MACs of attention products that shrink with the units (q@k, p@v)

    def root(self) -> Space:
        while self.parent is not self.parent.parent:
            self.parent = self.parent.parent
        return self.parent

    def merge(self, other: Space) -> None:
        a, b = self.root(), other.root()
        if a is not b:
            b.parent = a
            a.producers += b.producers
            a.followers += b.followers
            a.consumers += b.consumers
            a.reasons += b.reasons
            a.block = a.block * b.block // gcd(a.block, b.block)
            a.attention_macs += b.attention_macs


@dataclass(frozen=True)
class Seg:
    space: Space
    offset: int
    repeat: int
    block: int = 1


@dataclass(frozen=True)
class Tag:
    dim: int  # non-negative index of the dimension holding the units
    segs: tuple[Seg, ...]
    dirty: str = ""  # why the removed units' positions are not zero here ("" when they are)


def reshaped(tag: Tag, before: tuple[int, ...], after: tuple[int, ...], name: str) -> Tag:
    """The tag after a view / reshape / flatten / squeeze from ``before`` to ``after``: the units' dimension kept
    (other dimensions merged or split around it), merged with the dimensions after it, or split into heads."""
    d = tag.dim
    lead = prod(before[:d])
    d2 = next((i for i in range(len(after)) if prod(after[:i]) == lead), None)
    if d2 is not None and after[d2] == 1 and before[d] != 1:  # skip inserted size-1 dims before the units
        d2 = next((i for i in range(d2, len(after)) if after[i] != 1), None)
    if d2 is None or prod(after[:d2]) != lead:
        raise Refused(f"`{name}` mixes the units with other dimensions")
    size, new = after[d2], before[d]
    if size == new:
        return Tag(d2, tag.segs, tag.dirty)
    if size > new and size % new == 0:  # merged with the dims after it
        factor = size // new
        if factor not in {prod(before[d + 1 : e]) for e in range(d + 1, len(before) + 1)}:
            raise Refused(f"`{name}` mixes the units with other dimensions")
        return Tag(d2, tuple(_merged(s, factor) for s in tag.segs), tag.dirty)
    inner = new // size if size < new and new % size == 0 else 0
    if not inner or inner not in {prod(after[d2 + 1 : e]) for e in range(d2 + 1, len(after) + 1)}:
        raise Refused(f"`{name}` mixes the units with other dimensions")
    return Tag(d2, tuple(_split(s, inner, name) for s in tag.segs), tag.dirty)


def _split(seg: Seg, inner: int, name: str) -> Seg:
    """The units' dimension split into (heads, inner): one head position holds ``inner`` positions."""
    root = seg.space.root()
    extent = root.num_units // seg.block * seg.repeat
    if seg.offset % inner or extent % inner or not (seg.repeat % inner == 0 or inner % seg.repeat == 0):
        raise Refused(f"`{name}` splits the units into groups that cut across them")
    if seg.repeat % inner == 0:
        return Seg(seg.space, seg.offset // inner, seg.repeat // inner, seg.block)
    block = seg.block * inner // seg.repeat
    root.block = root.block * block // gcd(root.block, block)
    return Seg(seg.space, seg.offset // inner, 1, block)


def _merged(seg: Seg, factor: int) -> Seg:
    """The units' dimension merged with the ``factor`` positions after each of its positions."""
    repeat, block = seg.repeat * factor, seg.block
    if block > 1 and repeat % block == 0:  # a head's positions, shared out among its units again
        repeat, block = repeat // block, 1
    return Seg(seg.space, seg.offset * factor, repeat, block)
