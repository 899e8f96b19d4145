"""Follows units through a recorded forward pass (:mod:`lightning_compress.structure.trace`): the engine behind
:func:`lightning_compress.structure.dependency.find_unit_groups`, which documents the rules.

Each tensor that holds units is tagged with the dimension they lie along and segments ``(unit set, offset,
repeat, block)``: unit ``u`` of the set occupies positions ``offset + (u // block) * repeat ... + repeat - 1``.
``block > 1`` appears when a view splits the units into heads (``(B, T, H*hd) -> (B, T, H, hd)``): one position of
the head dimension holds ``block`` units, which can then only go together. A tag is *dirty* when the removed units'
positions hold non-zero values that stay confined to those positions (attention scores after the mask and the
softmax); a dirty tensor may only be multiplied by a clean one of the same units before it reaches anything else.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from dataclasses import replace
from math import prod

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from lightning_compress.structure.attention import ATTENTION_TYPES, attention_layout, unsupported
from lightning_compress.structure.kinds import (  # noqa: F401 - PRODUCER_TYPES etc. re-exported
    ADD,
    CAT,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    FOLLOWER_TYPES,
    MATMUL,
    OPAQUE_TYPES,
    PERMUTE,
    POOL_FUNCTIONS,
    POOL_MODULES,
    PRODUCER_TYPES,
    REDUCE,
    RESHAPE,
    SCALE,
    SOFTMAX,
    Refused,
    Seg,
    Space,
    Tag,
    reshaped,
)


def _is(node: fx.Node, kinds: tuple[set, set]) -> bool:
    functions, methods = kinds
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def shape(node: object) -> tuple[int, ...]:
    found = node.meta.get("shape") if isinstance(node, fx.Node) else None
    if found is None:
        raise Refused(f"`{getattr(node, 'name', node)}` is not a single tensor")
    return found


class Walk:
    """Visits the recorded graph in order, tagging tensors with their units and recording who consumes them."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.modules = dict(model.named_modules())
        self.tags: dict[fx.Node, Tag] = {}
        self.items: dict[fx.Node, dict[int, Tag]] = {}  # tuple results (attention): index -> tag
        self.spaces: dict[str, Space] = {}
        self.macs: dict[str, float] = defaultdict(float)  # producer -> MACs of its calls in this pass
        self.calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        owners: dict[int, set[str]] = defaultdict(set)
        for name, module in self.modules.items():
            for p in module._parameters.values():
                if p is not None:
                    owners[id(p)].add(name)
        self.sharing = {n for names in owners.values() if len(names) > 1 for n in names}

    def step(self, node: fx.Node) -> None:
        module = self.modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.items:
            tag = self.items[node.args[0]].get(node.args[1])  # type: ignore[arg-type, call-overload]
            if tag is not None:
                self.tags[node] = tag
            return
        touched = [a for a in node.all_input_nodes if a in self.tags]
        if touched:
            try:
                tag = self._follow(node, module)
                if tag is not None:
                    self.tags[node] = tag
            except Refused as err:
                for a in touched:
                    for seg in self.tags[a].segs:
                        seg.space.root().reasons.append(str(err))
        if isinstance(module, ATTENTION_TYPES):
            self._attention(node, module)
        elif isinstance(module, PRODUCER_TYPES):
            self.tags[node] = self._produce(node, module)

    # ------------------------------------------------------------------ producers
    def _space(self, name: str, space: Space, module: nn.Module, problem: str = "") -> Space:
        if name in self.spaces:
            self.spaces[name].merge(space)
        self.spaces.setdefault(name, space)
        problem = self.problem(name, module) or problem
        if problem:
            space.root().reasons.append(f"`{name}` {problem}")
        return space

    def _produce(self, node: fx.Node, module: nn.Module) -> Tag:
        name = str(node.target)
        space = self._space(name, Space(name, module.weight.shape[0]), module)
        spatial = 0 if isinstance(module, nn.Linear) else len(module.kernel_size)  # type: ignore[arg-type]
        try:
            out = shape(node)
            self.macs[name] += prod(out) * module.weight[0].numel()
            dim = len(out) - 1 - spatial
        except Refused as err:
            space.root().reasons.append(str(err))
            dim = 0
        return Tag(dim, (Seg(space, 0, 1),))

    def _attention(self, node: fx.Node, module: nn.Module) -> None:
        """An attention module: its heads (rows of in_proj_weight, columns of out_proj) and out_proj's units."""
        name, out_name = str(node.target), f"{node.target}.out_proj"
        embed, heads, head_dim = attention_layout(module)
        inner = heads * head_dim
        space = self._space(name, Space(name, inner, parts=3, block=head_dim), module, unsupported(module))
        space.consumers.append((out_name, 1, 0))
        out_space = self._space(out_name, Space(out_name, embed), module.out_proj)
        query, key = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        try:
            q_tokens, k_tokens = prod(shape(query)) // embed, prod(shape(key)) // embed
            source = shape(key)[1 if module.batch_first and len(shape(key)) == 3 else 0]
            self.macs[name] += embed * inner * (q_tokens + 2 * k_tokens)
            space.attention_macs += 2 * q_tokens * source * inner
            self.macs[out_name] += q_tokens * inner * embed
            dim = len(shape(query)) - 1
        except Refused as err:
            space.reasons.append(str(err))
            dim = 0
        self.items[node] = {0: Tag(dim, (Seg(out_space, 0, 1),))}

    def problem(self, name: str, module: nn.Module) -> str:
        if self.calls[name] > 1:
            return "is called more than once"
        if name in self.sharing:
            return "shares a parameter with another module"
        if parametrize.is_parametrized(module):
            return "is parametrized"
        if getattr(module, "groups", 1) != 1:
            return f"is a grouped convolution (groups={module.groups})"
        return ""

    # ------------------------------------------------------------------ following
    def _follow(self, node: fx.Node, module: nn.Module | None) -> Tag | None:
        if node.op == "output":
            raise Refused("model output")
        if module is not None:
            return self._follow_module(node, module)
        if (node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and node.target in ELEMENTWISE_METHODS
        ):
            return self._same(node)
        if node.op == "call_function" and node.target in POOL_FUNCTIONS:
            return self._pool(node, POOL_FUNCTIONS[node.target])  # type: ignore[index]
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

    def _follow_module(self, node: fx.Node, module: nn.Module) -> Tag | None:
        name = str(node.target)
        if isinstance(module, ATTENTION_TYPES):
            raise Refused(f"units reach the input of `{name}` ({type(module).__name__}), which is not supported")
        if isinstance(module, PRODUCER_TYPES):
            tag = self._input_tag(node)
            problem = self.problem(name, module)
            if problem:
                raise Refused(f"consumed by `{name}`, which {problem}")
            self._clean(tag, f"`{name}`")
            spatial = 0 if isinstance(module, nn.Linear) else len(module.kernel_size)  # type: ignore[arg-type]
            if tag.dim != len(shape(node.args[0])) - 1 - spatial:
                raise Refused(f"`{name}` does not read the units as its input features")
            for seg in tag.segs:
                seg.space.root().consumers.append((name, seg.repeat, seg.offset))
            return None
        if isinstance(module, FOLLOWER_TYPES):
            tag = self._same(node)
            problem = self.problem(name, module) or ("" if module.affine else "has no affine weight and bias")
            if problem:
                raise Refused(f"followed by `{name}`, which {problem}")
            self._clean(tag, f"`{name}`")
            seg = tag.segs[0]
            if tag.dim != 1 or len(tag.segs) != 1 or (seg.offset, seg.repeat) != (0, 1):
                raise Refused(f"`{name}` normalizes concatenated or flattened units (not supported)")
            seg.space.root().followers.append(name)
            return tag
        if isinstance(module, ELEMENTWISE_MODULES) or (isinstance(module, nn.PReLU) and module.num_parameters == 1):
            return self._same(node)
        for kind, spatial in POOL_MODULES:
            if isinstance(module, kind):
                return self._pool(node, spatial)
        if isinstance(module, nn.Flatten):
            return self._reshape(node)
        raise Refused(f"units reach `{name}` ({type(module).__name__}), which is not supported")

    def _clean(self, tag: Tag, reader: str) -> None:
        if tag.dirty:
            raise Refused(tag.dirty)
        if any(s.block != 1 for s in tag.segs):
            raise Refused(f"{reader} reads whole heads as single inputs (not supported)")

    # ------------------------------------------------------------------ one kind of operation each
    def _input_tag(self, node: fx.Node) -> Tag:
        source = node.args[0] if node.args else None
        others = [a for a in node.all_input_nodes if a in self.tags and a is not source]
        if source not in self.tags or others:
            raise Refused(f"`{node.name}` combines the units with another tensor")
        return self.tags[source]  # type: ignore[index]

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
        ta, tb = self.tags.get(a), self.tags.get(b) if isinstance(b, fx.Node) else None  # type: ignore[arg-type]
        if ta is None or tb is None:  # the units plus something that holds no units: they no longer stay 0
            tagged, other = (a, b) if ta is not None else (b, a)
            tag = self.tags[tagged]  # type: ignore[index]
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
        if (dividing and tensor is not a) or (isinstance(other, fx.Node) and other in self.tags):
            raise Refused(f"`{node.name}` multiplies or divides the units by a tensor")
        if node.kwargs.get("rounding_mode") is not None or shape(node) != shape(tensor):
            raise Refused(f"`{node.name}` changes the shape of the units' tensor")
        tag = self.tags[tensor]  # type: ignore[index]
        if isinstance(other, fx.Node):  # times a tensor that holds no units: fine if it is the same for every unit
            rank, other_shape = len(shape(node)), shape(other)
            position = tag.dim - (rank - len(other_shape))
            if position >= 0 and other_shape[position] != 1:
                raise Refused(f"`{node.name}` multiplies or divides the units by a tensor")
        return tag

    def _reduce(self, node: fx.Node) -> Tag | None:
        tag = self._input_tag(node)
        rank = len(shape(node.args[0]))
        dims = _arg(node, 1, "dim")
        keepdim = _arg(node, 2, "keepdim", False)
        dims = [dims] if isinstance(dims, int) else dims
        if not dims or not all(isinstance(d, int) for d in dims) or tag.dim in [d % rank for d in dims]:
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
        if node.target in (torch.transpose, "transpose"):
            pair = [d % rank for d in rest[:2]]
            order = list(range(rank))
            order[pair[0]], order[pair[1]] = pair[1], pair[0]
        else:
            order = [d % rank for d in (rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest)]
        return Tag(order.index(tag.dim), tag.segs, tag.dirty)

    def _batched(self, node: fx.Node, operands: list[object], kind: str) -> list[tuple[Tag, int]]:
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
            self._attention_macs(node, found[0][0], shape(node.args[0])[-1])  # type: ignore[arg-type]
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
        tensors = _arg(node, 0, "tensors", ())
        dim = _arg(node, 1, "dim", 0) % len(shape(node))  # type: ignore[operator]
        segs: list[Seg] = []
        offset = 0
        for t in tensors:  # type: ignore[union-attr]
            tag = self.tags.get(t)
            if tag is not None:
                self._clean(tag, f"`{node.name}`") if tag.dirty else None
                if tag.dim != dim:
                    raise Refused(f"`{node.name}` concatenates along a dimension other than the units'")
                segs += [Seg(s.space, s.offset + offset, s.repeat, s.block) for s in tag.segs]
            offset += shape(t)[dim]
        return Tag(dim, tuple(segs))


def _layout(tag: Tag) -> list[tuple[int, int, int, int]]:
    return [(s.offset, s.repeat, s.block, s.space.root().num_units) for s in tag.segs]
