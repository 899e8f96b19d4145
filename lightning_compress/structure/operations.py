"""How units pass through torch functions and Tensor methods (``+``, ``view``, ``softmax``, ``@``, ``torch.cat``
...): one rule per kind of operation, each returning the tag of the result or raising
:class:`~lightning_compress.structure.kinds.Refused`. :class:`Operations` is the base of
:class:`lightning_compress.structure.walk.Walk`, which adds the modules; the tags are described there. Pure PyTorch.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from math import prod

import torch
import torch.nn.functional as F
from torch import fx

from lightning_compress.structure.kinds import (
    ADD,
    CAT,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    MATMUL,
    PERMUTE,
    POOL_FUNCTIONS,
    REDUCE,
    RESHAPE,
    SCALE,
    SOFTMAX,
    Refused,
    Seg,
    Tag,
    reshaped,
)


def shape(node: object) -> tuple[int, ...]:
    """The recorded shape of a node's tensor."""
    found = node.meta.get("shape") if isinstance(node, fx.Node) else None
    if found is None:
        raise Refused(f"`{getattr(node, 'name', node)}` is not a single tensor")
    return found


def _is(node: fx.Node, kinds: tuple[set, set]) -> bool:
    functions, methods = kinds
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def _arg(node: fx.Node, index: int, name: str, default: fx.node.Argument = None) -> fx.node.Argument:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _ints(value: fx.node.Argument) -> list[int] | None:
    """``value`` as a list of dimensions (an int or a list / tuple of ints), else None."""
    items = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(d, int) for d in items):
        return None
    return [d for d in items if isinstance(d, int)]


def _layout(tag: Tag) -> list[tuple[int, int, int, int]]:
    return [(s.offset, s.repeat, s.block, s.space.root().num_units) for s in tag.segs]


class Operations:
    """The rules for torch functions and Tensor methods over ``tags``: the tensors that hold units so far."""

    def __init__(self) -> None:
        self.tags: dict[fx.Node, Tag] = {}

    def _follow_operation(self, node: fx.Node) -> Tag | None:
        if (node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and node.target in ELEMENTWISE_METHODS
        ):
            return self._same(node)
        if node.op == "call_function" and node.target in POOL_FUNCTIONS:
            return self._pool(node, POOL_FUNCTIONS[node.target])
        for kinds, rule in ((ADD, self._add), (SCALE, self._scale), (REDUCE, self._reduce),
                            (RESHAPE, self._reshape), (PERMUTE, self._permute), (MATMUL, self._matmul),
                            (SOFTMAX, self._softmax)):
            if _is(node, kinds):
                return rule(node)
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            return self._sdpa(node)
        if node.op == "call_function" and node.target in CAT:
            return self._cat(node)
        what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        raise Refused(f"units reach `{what}` at `{node.name}`, which is not supported")

    def _clean(self, tag: Tag, reader: str) -> None:
        if tag.dirty:
            raise Refused(tag.dirty)
        if any(s.block != 1 for s in tag.segs):
            raise Refused(f"{reader} reads whole heads as single inputs (not supported)")

    def _input_tag(self, node: fx.Node) -> Tag:
        source = node.args[0] if node.args else None
        others = [a for a in node.all_input_nodes if a in self.tags and a is not source]
        if not isinstance(source, fx.Node) or source not in self.tags or others:
            raise Refused(f"`{node.name}` combines the units with another tensor")
        return self.tags[source]

    def _tag(self, value: fx.node.Argument) -> Tag | None:
        return self.tags.get(value) if isinstance(value, fx.Node) else None

    # ------------------------------------------------------------------ one kind of operation each
    def _same(self, node: fx.Node) -> Tag:
        tag = self._input_tag(node)
        if shape(node) != shape(node.args[0]):
            raise Refused(f"`{node.name}` changes the shape of the units' tensor")
        return tag

    def _pool(self, node: fx.Node, spatial: int) -> Tag:
        tag = self._input_tag(node)
        before, after = shape(node.args[0]), shape(node)
        kept = len(before) - spatial
        if len(after) != len(before) or tag.dim >= kept or after[:kept] != before[:kept]:
            raise Refused(f"`{node.name}` pools over the units")
        return tag

    def _add(self, node: fx.Node) -> Tag:
        a, b = node.args[0], _arg(node, 1, "other")
        ta, tb = self._tag(a), self._tag(b)
        if ta is None or tb is None:  # the units plus something that holds no units: they no longer stay 0
            tagged, other, tag = (a, b, ta) if ta is not None else (b, a, tb)
            if tag is None:  # the units reach it through another argument
                raise Refused(f"`{node.name}` combines the units with another tensor")
            if isinstance(other, fx.Node) and shape(node) != shape(tagged):
                raise Refused(f"`{node.name}` broadcasts the units' tensor")
            what = ("adds the units to a tensor no prunable layer produces (e.g. the input)"
                    if isinstance(other, fx.Node) else "adds a constant to the units (a removed unit would not stay 0)")
            return replace(tag, dirty=tag.dirty or f"`{node.name}` {what}")
        if not shape(a) == shape(b) == shape(node):
            raise Refused(f"`{node.name}` broadcasts the units' tensor")
        self._clean(ta, f"`{node.name}`") if ta.dirty else None
        self._clean(tb, f"`{node.name}`") if tb.dirty else None
        if ta.dim != tb.dim or _layout(ta) != _layout(tb):
            raise Refused(f"`{node.name}` adds tensors whose units are laid out differently")
        for sa, sb in zip(ta.segs, tb.segs):
            sa.space.merge(sb.space)
        return ta

    def _scale(self, node: fx.Node) -> Tag:
        a, b = node.args[0], _arg(node, 1, "other")
        dividing = node.target in (operator.truediv, torch.div, "div", "div_")
        tensor, other = (a, b) if a in self.tags else (b, a)
        tag = self._tag(tensor)
        if tag is None or (dividing and tensor is not a) or self._tag(other) is not None:
            raise Refused(f"`{node.name}` multiplies or divides the units by a tensor")
        if node.kwargs.get("rounding_mode") is not None or shape(node) != shape(tensor):
            raise Refused(f"`{node.name}` changes the shape of the units' tensor")
        if isinstance(other, fx.Node):  # times a tensor that holds no units: fine if it is the same for every unit
            rank, other_shape = len(shape(node)), shape(other)
            position = tag.dim - (rank - len(other_shape))
            if position >= 0 and other_shape[position] != 1:
                raise Refused(f"`{node.name}` multiplies or divides the units by a tensor")
        return tag

    def _reduce(self, node: fx.Node) -> Tag | None:
        tag = self._input_tag(node)
        rank = len(shape(node.args[0]))
        dims = _ints(_arg(node, 1, "dim"))
        keepdim = _arg(node, 2, "keepdim", False)
        if not dims or tag.dim in [d % rank for d in dims]:
            if node.target in (torch.sum, "sum") and not tag.dirty:
                return None  # removed units add zero to a sum: the result holds no units and does not change
            raise Refused(f"`{node.name}` reduces over the units")
        return Tag(tag.dim if keepdim else tag.dim - sum(d % rank < tag.dim for d in dims), tag.segs, tag.dirty)

    def _softmax(self, node: fx.Node) -> Tag:
        tag = self._input_tag(node)
        dim = _arg(node, 1, "dim")
        if not isinstance(dim, int) or dim % len(shape(node)) == tag.dim:
            raise Refused(f"`{node.name}` normalizes over the units")
        return replace(tag, dirty=tag.dirty or f"`{node.name}` turns the removed units' zeros into non-zero values")

    def _reshape(self, node: fx.Node) -> Tag:
        return reshaped(self._input_tag(node), shape(node.args[0]), shape(node), node.name)

    def _permute(self, node: fx.Node) -> Tag:
        tag = self._input_tag(node)
        rank = len(shape(node.args[0]))
        rest = list(node.args[1:]) or list(node.kwargs.values())
        transpose = node.target in (torch.transpose, "transpose")
        dims = _ints(rest[:2] if transpose else rest[0] if len(rest) == 1 else rest)
        if dims is None or len(dims) != (2 if transpose else rank):
            raise Refused(f"`{node.name}` permutes by dimensions that are not constants")
        if transpose:
            order = list(range(rank))
            order[dims[0] % rank], order[dims[1] % rank] = dims[1] % rank, dims[0] % rank
        else:
            order = [d % rank for d in dims]
        return Tag(order.index(tag.dim), tag.segs, tag.dirty)

    def _batched(self, node: fx.Node, operands: list[fx.node.Argument], kind: str) -> list[tuple[Tag, int]]:
        """Tags of the operands that hold units, each with the output dimension of its units, which must be a
        batch dimension (one matrix product per unit)."""
        out_rank, found = len(shape(node)), []
        for x in operands:
            if isinstance(x, fx.Node) and x in self.tags:
                tag, rank = self.tags[x], len(shape(x))
                if tag.dim >= rank - 2 or rank < 3:
                    raise Refused(f"`{node.name}` {kind} over the units (only per-head products are supported)")
                found.append((tag, tag.dim + out_rank - rank))
        if len({d for _, d in found}) > 1 or any(_layout(t) != _layout(found[0][0]) for t, _ in found):
            raise Refused(f"`{node.name}` multiplies tensors whose units are laid out differently")
        for x in operands:  # an operand without the units must be the same for every unit (broadcast)
            if isinstance(x, fx.Node) and x not in self.tags and found:
                position = found[0][1] - (out_rank - len(shape(x)))
                if position >= 0 and shape(x)[position] != 1:
                    raise Refused(f"`{node.name}` {kind} the units with a tensor that has one entry per unit")
        return found

    def _matmul(self, node: fx.Node) -> Tag:
        found = self._batched(node, [node.args[0], _arg(node, 1, "other", _arg(node, 1, "mat2"))], "multiplies")
        for tag, _ in found[1:]:
            for sa, sb in zip(found[0][0].segs, tag.segs):
                sa.space.merge(sb.space)
        clean = [t for t, _ in found if not t.dirty]
        if len(found) == 2 and clean:  # a removed unit's product is zero when one factor is zero there
            self._attention_macs(node, found[0][0], shape(node.args[0])[-1])
        return Tag(found[0][1], found[0][0].segs, "" if clean else found[0][0].dirty)

    def _sdpa(self, node: fx.Node) -> Tag:
        q, k, v = node.args[0], _arg(node, 1, "key"), _arg(node, 2, "value")
        found = self._batched(node, [q, k, v], "attends")
        if len(found) != 3 or any(t.dirty for t, _ in found):
            raise Refused(f"`{node.name}` attends with some of query / key / value not holding the units")
        for tag, _ in found[1:]:
            for sa, sb in zip(found[0][0].segs, tag.segs):
                sa.space.merge(sb.space)
        source = shape(k)[-2]
        self._attention_macs(node, found[0][0], source * (shape(q)[-1] + shape(v)[-1]) / shape(node)[-1])
        return Tag(found[0][1], found[0][0].segs)

    def _attention_macs(self, node: fx.Node, tag: Tag, per_output: float) -> None:
        root = tag.segs[0].space.root()
        root.attention_macs += prod(shape(node)) * per_output

    def _cat(self, node: fx.Node) -> Tag:
        tensors, dim = _arg(node, 0, "tensors", ()), _arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise Refused(f"`{node.name}` concatenates with arguments that were not recorded as a list and a dim")
        dim %= len(shape(node))
        segs: list[Seg] = []
        offset = 0
        for t in tensors:
            tag = self._tag(t)
            if tag is not None:
                self._clean(tag, f"`{node.name}`") if tag.dirty else None
                if tag.dim != dim:
                    raise Refused(f"`{node.name}` concatenates along a dimension other than the units'")
                segs += [Seg(s.space, s.offset + offset, s.repeat, s.block) for s in tag.segs]
            offset += shape(t)[dim]
        return Tag(dim, tuple(segs))
