"""Follows units through a recorded forward pass (:mod:`lightning_compress.structure.trace`): the engine behind
:func:`lightning_compress.structure.dependency.find_unit_groups`, which documents the rules. This module handles
the modules (producers, attention, their consumers and followers); :mod:`lightning_compress.structure.operations`
the torch functions and Tensor methods between them.

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
from math import prod

from torch import fx, nn
from torch.nn.utils import parametrize

from lightning_compress.core.modules import weight_of
from lightning_compress.structure.attention import ATTENTION_TYPES, AttentionModule, attention_layout, unsupported
from lightning_compress.structure.kinds import (
    ELEMENTWISE_MODULES,
    FOLLOWER_TYPES,
    POOL_MODULES,
    PRODUCER_TYPES,
    Refused,
    Seg,
    Space,
    Tag,
)
from lightning_compress.structure.operations import Operations, shape


class Walk(Operations):
    """Visits the recorded graph in order, tagging tensors with their units and recording who consumes them; the
    rules for torch functions and Tensor methods are :class:`~lightning_compress.structure.operations.Operations`'."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        super().__init__()
        self.modules = dict(model.named_modules())
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
        module = self.modules.get(str(node.target)) if node.op == "call_module" else None
        source = node.args[0] if node.args else None
        if (node.op == "call_function" and node.target is operator.getitem and isinstance(source, fx.Node)
                and source in self.items):
            index = node.args[1]
            tag = self.items[source].get(index) if isinstance(index, int) else None
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
        weight = weight_of(module, name)
        space = self._space(name, Space(name, weight.shape[0]), module)
        try:
            out = shape(node)
            self.macs[name] += prod(out) * weight[0].numel()
            dim = len(out) - 1 - _spatial(module, name)
        except Refused as err:
            space.root().reasons.append(str(err))
            dim = 0
        return Tag(dim, (Seg(space, 0, 1),))

    def _attention(self, node: fx.Node, module: AttentionModule) -> None:
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
        return self._follow_operation(node)

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
            if tag.dim != len(shape(node.args[0])) - 1 - _spatial(module, name):
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


def _spatial(module: nn.Module, name: str) -> int:
    """How many spatial dimensions a producer's input has: 0 for Linear, the kernel's for Conv{1,2,3}d."""
    return weight_of(module, name).dim() - 2
