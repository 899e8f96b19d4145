"""Which output units of each Linear / Conv layer can be removed, and what must shrink with them. Pure torch.fx.

A *unit* is an output feature of a ``Linear`` (a weight row) or an output channel of a ``Conv{1,2,3}d``.
Removing it also removes its entries in channel-wise *followers* (BatchNorm) and the input columns / channels
of the *consumers* that read it. :func:`find_unit_groups` traces the model with ``torch.fx.symbolic_trace``,
runs the example input through the graph once (``ShapeProp``, in eval mode, no grad) to learn every tensor's
shape, then walks the graph in order and tags each tensor with where units lie along one dimension: segments
``(unit set, offset, repeat)``, unit ``u`` occupying positions ``offset + u*repeat ... + repeat-1``.

Why it is exact: a pruned unit has a zero weight row and bias and zero follower affine entries, so its value
is 0 wherever it flows. Every operation followed maps 0 to 0 and keeps units apart, so removing the unit and
the consumer columns reading it changes nothing. Followed:

- element-wise activations and dropout (ReLU, GELU, SiLU, Tanh, ... and their ``F.*`` / method forms), scalar
  ``*`` and ``/``, pooling and ``mean``/``sum``/``amax`` over other dimensions, ``permute``/``transpose``;
- BatchNorm / SyncBatchNorm with affine parameters (a follower);
- flatten / view / reshape that merge the unit dim with the dims after it (repeat multiplies, e.g. by H*W);
  ``view``/``reshape`` only with ``-1`` in the unit position (a literal size would break after compaction);
- concatenation along the unit dim (consumer entries get an offset);
- residual ``+`` / ``-`` of two tensors with the same unit layout: their unit sets are merged into one set,
  whose producers are ``coupled`` (a unit goes only when it goes from all of them).

Anything else that reads the units marks the whole unit set ``prunable=False`` with a reason: the model output,
LayerNorm and other modules, ``sigmoid`` and other maps of 0 to non-zero, adding a constant or a tensor that no
prunable layer produces (e.g. the model input), broadcasting, products of tensors, indexing, reading the unit
dimension's size, BatchNorm without affine or after a concat / flatten, grouped convolutions, layers called
twice, sharing parameters or parametrized. If fx cannot trace the model (data-dependent control flow) every
layer is unprunable with the tracing error as the reason: no per-module guessing.
"""

from __future__ import annotations

import builtins
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

PRODUCER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FOLLOWER_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class UnitGroup:
    """The output units of ``producer`` and everything that holds an entry per unit."""

    producer: str  # qualified name of the Linear / Conv, relative to the module analysed
    num_units: int
    followers: list[str] = field(default_factory=list)  # BatchNorms: weight, bias, running stats go with the unit
    consumers: list[tuple[str, int, int]] = field(default_factory=list)  # (name, repeat, offset) of input columns
    prunable: bool = True
    reason: str = ""  # why not prunable
    coupled: list[str] = field(default_factory=list)  # producers whose units are the same units (residual add)


class _Refused(Exception):
    """The operation at hand cannot be followed: every unit set it touches becomes unprunable."""


class _Space:
    """One set of units (union-find node: residual adds merge sets)."""

    def __init__(self, producer: str, num_units: int) -> None:
        self.parent, self.num_units = self, num_units
        self.producers, self.followers, self.reasons = [producer], [], []  # type: list[str], list[str], list[str]
        self.consumers: list[tuple[str, int, int]] = []

    def root(self) -> _Space:
        while self.parent is not self.parent.parent:
            self.parent = self.parent.parent
        return self.parent

    def merge(self, other: _Space) -> None:
        a, b = self.root(), other.root()
        if a is not b:
            b.parent = a
            a.producers += b.producers
            a.followers += b.followers
            a.consumers += b.consumers
            a.reasons += b.reasons


@dataclass(frozen=True)
class _Seg:
    space: _Space
    offset: int
    repeat: int


@dataclass(frozen=True)
class _Tag:
    dim: int  # non-negative index of the dimension holding the units
    segs: tuple[_Seg, ...]


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh,
    nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, torch.tanh, F.tanh,
    F.elu, F.selu, F.celu, F.hardtanh, F.hardswish, F.softsign, F.tanhshrink, F.hardshrink, F.softshrink,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "double", "half"}
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
}  # fmt: skip
_ADD = ({operator.add, operator.sub, torch.add, torch.sub}, {"add", "sub", "add_", "sub_"})
_SCALE = ({operator.mul, torch.mul, operator.truediv, torch.div}, {"mul", "mul_", "div", "div_"})
_REDUCE = ({torch.mean, torch.sum, torch.amax}, {"mean", "sum", "amax"})
_RESHAPE = ({torch.flatten, torch.reshape}, {"flatten", "view", "reshape"})
_PERMUTE = ({torch.permute, torch.transpose}, {"permute", "transpose"})
_CAT = {torch.cat, torch.concat, torch.concatenate}
_HARMLESS_ATTRIBUTES = {"dtype", "device", "ndim", "is_cuda", "requires_grad"}


def find_unit_groups(model: nn.Module, example_input: torch.Tensor | tuple) -> dict[str, UnitGroup]:
    """A :class:`UnitGroup` for every Linear / Conv{1,2,3}d of ``model``, keyed by its qualified name."""
    args = as_args(example_input, model)
    names = [n for n, m in model.named_modules() if type(m) in PRODUCER_TYPES]
    try:
        graph = _traced_graph(model, args)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "cannot analyse", reported per layer
        message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        reason = f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {message}"
        return {n: UnitGroup(n, num_units(model.get_submodule(n)), prunable=False, reason=reason) for n in names}
    walk = _Walk(model, graph)
    for node in graph.nodes:
        walk.step(node)
    return {n: walk.group(n) for n in names}


def num_units(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def as_args(example_input: Any, model: nn.Module | None = None) -> tuple:
    """The example input as a tuple of positional arguments; with ``model``, its floating-point tensors moved to
    the device and dtype of the model's first parameter (e.g. a CPU ``example_input_array`` for a GPU model)."""
    if isinstance(example_input, torch.Tensor):
        args: tuple = (example_input,)
    elif isinstance(example_input, (tuple, list)):
        args = tuple(example_input)
    else:
        raise TypeError(f"`example_input` must be a tensor or a tuple of tensors, got {type(example_input).__name__}")
    reference = next((p for p in model.parameters() if p.is_floating_point()), None) if model is not None else None
    if reference is None:
        return args
    return tuple(
        a.to(reference.device, reference.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


def _traced_graph(model: nn.Module, args: tuple) -> fx.Graph:
    modes = {m: m.training for m in model.modules()}
    model.eval()  # shape propagation must not update BatchNorm statistics
    try:
        traced = fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(traced).propagate(*args)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return traced.graph


def _shape(node: Any) -> tuple[int, ...]:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None) if isinstance(node, fx.Node) else None
    if shape is None:
        raise _Refused(f"`{getattr(node, 'name', node)}` is not a single tensor")
    return tuple(shape)


def _is(node: fx.Node, kinds: tuple[set, set]) -> bool:
    functions, methods = kinds
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


class _Walk:
    """Visits the graph in order, tagging tensors with their units and recording who consumes them."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.modules = dict(model.named_modules())
        self.tags: dict[fx.Node, _Tag] = {}
        self.shape_reads: dict[fx.Node, fx.Node] = {}  # `x.shape` / `x.size()` node -> x
        self.spaces: dict[str, _Space] = {}
        self.calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        owners: dict[int, set[str]] = defaultdict(set)
        for name, module in self.modules.items():
            for p in module._parameters.values():
                if p is not None:
                    owners[id(p)].add(name)
        self.sharing = {n for names in owners.values() if len(names) > 1 for n in names}

    def group(self, name: str) -> UnitGroup:
        module = self.modules[name]
        if name not in self.spaces:
            reason = "not called in the traced forward (unused, or inside a module that torch.fx does not trace)"
            return UnitGroup(name, num_units(module), prunable=False, reason=reason)
        root = self.spaces[name].root()
        return UnitGroup(
            producer=name,
            num_units=num_units(module),
            followers=_unique(root.followers),
            consumers=_unique(root.consumers),
            prunable=not root.reasons,
            reason="; ".join(_unique(root.reasons)),
            coupled=[p for p in _unique(root.producers) if p != name],
        )

    # ------------------------------------------------------------------ walking
    def step(self, node: fx.Node) -> None:
        module = self.modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]
        touched = [a for a in node.all_input_nodes if a in self.tags or a in self.shape_reads]
        if touched:
            try:
                tag = self._follow(node, module)
                if tag is not None:
                    self.tags[node] = tag
            except _Refused as err:
                for a in touched:
                    for seg in self.tags[self.shape_reads.get(a, a)].segs:
                        seg.space.root().reasons.append(str(err))
        if type(module) in PRODUCER_TYPES:
            self.tags[node] = self._produce(node, module)  # type: ignore[arg-type]

    def _produce(self, node: fx.Node, module: nn.Module) -> _Tag:
        name = str(node.target)
        space = _Space(name, num_units(module))
        if name in self.spaces:
            self.spaces[name].merge(space)
        self.spaces.setdefault(name, space)
        problem = self._problem(name, module)
        if problem:
            space.root().reasons.append(f"`{name}` {problem}")
        spatial = 0 if isinstance(module, nn.Linear) else len(module.kernel_size)  # type: ignore[arg-type]
        try:
            dim = len(_shape(node)) - 1 - spatial
        except _Refused as err:
            space.root().reasons.append(str(err))
            dim = 0
        return _Tag(dim, (_Seg(space, 0, 1),))

    def _problem(self, name: str, module: nn.Module) -> str:
        if self.calls[name] > 1:
            return "is called more than once"
        if name in self.sharing:
            return "shares a parameter with another module"
        if parametrize.is_parametrized(module):
            return "is parametrized"
        if getattr(module, "groups", 1) != 1:
            return f"is a grouped convolution (groups={module.groups})"
        return ""

    def _follow(self, node: fx.Node, module: nn.Module | None) -> _Tag | None:
        if node.op == "output":
            raise _Refused("model output")
        reads = [a for a in node.all_input_nodes if a in self.shape_reads]
        if reads:
            return self._use_shape(node, reads)
        if module is not None:
            return self._follow_module(node, module)
        if node.op == "call_function" and node.target is builtins.getattr:
            if node.args[1] == "shape":
                self.shape_reads[node] = node.args[0]  # type: ignore[assignment]
                return None
            if node.args[1] in _HARMLESS_ATTRIBUTES:
                return None
        if node.op == "call_method" and node.target in ("size", "dim", "ndimension"):
            return self._size(node)
        if (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _ELEMENTWISE_METHODS
        ):
            return self._same(node)
        if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
            return self._pool(node, _POOL_FUNCTIONS[node.target])  # type: ignore[index]
        if _is(node, _ADD):
            return self._add(node)
        if _is(node, _SCALE):
            return self._scale(node)
        if _is(node, _REDUCE):
            return self._reduce(node)
        if _is(node, _RESHAPE):
            spec = None if node.target in (torch.flatten, "flatten") else _view_spec(node)
            return self._reshape(node, spec)
        if _is(node, _PERMUTE):
            return self._permute(node)
        if node.op == "call_function" and node.target in _CAT:
            return self._cat(node)
        what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        raise _Refused(f"units reach `{what}` at `{node.name}`, which is not supported")

    def _follow_module(self, node: fx.Node, module: nn.Module) -> _Tag | None:
        name = str(node.target)
        if type(module) in PRODUCER_TYPES:
            tag = self._input_tag(node)
            problem = self._problem(name, module)
            if problem:
                raise _Refused(f"consumed by `{name}`, which {problem}")
            shape = _shape(node.args[0])
            spatial = 0 if isinstance(module, nn.Linear) else len(module.kernel_size)  # type: ignore[arg-type]
            if tag.dim != len(shape) - 1 - spatial:
                raise _Refused(f"`{name}` does not read the units as its input features")
            for seg in tag.segs:
                seg.space.root().consumers.append((name, seg.repeat, seg.offset))
            return None
        if type(module) in FOLLOWER_TYPES:
            tag = self._same(node)
            problem = self._problem(name, module) or ("" if module.affine else "has no affine weight and bias")
            if problem:
                raise _Refused(f"followed by `{name}`, which {problem}")
            seg = tag.segs[0]
            if tag.dim != 1 or len(tag.segs) != 1 or (seg.offset, seg.repeat) != (0, 1):
                raise _Refused(f"`{name}` normalizes concatenated or flattened units (not supported)")
            seg.space.root().followers.append(name)
            return tag
        if isinstance(module, _ELEMENTWISE_MODULES) or (isinstance(module, nn.PReLU) and module.num_parameters == 1):
            return self._same(node)
        if type(module) in _POOL_MODULES:
            return self._pool(node, _POOL_MODULES[type(module)])
        if isinstance(module, nn.Flatten):
            return self._reshape(node, None)
        raise _Refused(f"units reach `{name}` ({type(module).__name__}), which is not supported")

    # ------------------------------------------------------------------ one kind of operation each
    def _input_tag(self, node: fx.Node) -> _Tag:
        source = node.args[0] if node.args else None
        others = [a for a in node.all_input_nodes if a in self.tags and a is not source]
        if source not in self.tags or others:
            raise _Refused(f"`{node.name}` combines the units with another tensor")
        return self.tags[source]  # type: ignore[index]

    def _same(self, node: fx.Node) -> _Tag:
        tag = self._input_tag(node)
        if _shape(node) != _shape(node.args[0]):
            raise _Refused(f"`{node.name}` changes the shape of the units' tensor")
        return tag

    def _pool(self, node: fx.Node, spatial: int) -> _Tag:
        tag = self._input_tag(node)
        before, after = _shape(node.args[0]), _shape(node)
        kept = len(before) - spatial
        if len(after) != len(before) or tag.dim >= kept or after[:kept] != before[:kept]:
            raise _Refused(f"`{node.name}` pools over the units")
        return tag

    def _add(self, node: fx.Node) -> _Tag:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            raise _Refused(f"`{node.name}` adds a constant to the units (a removed unit would not stay 0)")
        if not _shape(a) == _shape(b) == _shape(node):
            raise _Refused(f"`{node.name}` broadcasts the units' tensor")
        ta, tb = self.tags.get(a), self.tags.get(b)
        if ta is None or tb is None:
            raise _Refused(f"`{node.name}` adds the units to a tensor no prunable layer produces (e.g. the input)")
        layout = lambda t: [(s.offset, s.repeat, s.space.root().num_units) for s in t.segs]  # noqa: E731
        if ta.dim != tb.dim or layout(ta) != layout(tb):
            raise _Refused(f"`{node.name}` adds tensors whose units are laid out differently")
        for sa, sb in zip(ta.segs, tb.segs):
            sa.space.merge(sb.space)
        return ta

    def _scale(self, node: fx.Node) -> _Tag:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        tensor, scalar = (a, b) if isinstance(a, fx.Node) else (b, a)
        dividing = node.target in (operator.truediv, torch.div, "div", "div_")
        scalar_ok = isinstance(scalar, (int, float)) and not (dividing and tensor is not a)
        if not (scalar_ok and node.kwargs.get("rounding_mode") is None and tensor in self.tags):
            raise _Refused(f"`{node.name}` multiplies or divides the units by a tensor")
        if _shape(node) != _shape(tensor):
            raise _Refused(f"`{node.name}` changes the shape of the units' tensor")
        return self.tags[tensor]  # type: ignore[index]

    def _reduce(self, node: fx.Node) -> _Tag:
        tag = self._input_tag(node)
        rank = len(_shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = [dims] if isinstance(dims, int) else dims
        if not dims or not all(isinstance(d, int) for d in dims) or tag.dim in [d % rank for d in dims]:
            raise _Refused(f"`{node.name}` reduces over the units")
        return _Tag(tag.dim if keepdim else tag.dim - sum(d % rank < tag.dim for d in dims), tag.segs)

    def _reshape(self, node: fx.Node, spec: list | None) -> _Tag:
        tag = self._input_tag(node)
        d, before, after = tag.dim, _shape(node.args[0]), _shape(node)
        if after[: d + 1] == before[: d + 1]:  # the unit dim and all before it unchanged
            factor = 1
        elif d < len(after) and after[:d] == before[:d]:  # the unit dim merged with the dims after it
            end = d
            while end + 1 < len(before) and prod(before[d : end + 1]) < after[d]:
                end += 1
            if prod(before[d : end + 1]) != after[d]:
                raise _Refused(f"`{node.name}` mixes the units with other dimensions")
            factor = prod(before[d + 1 : end + 1])
        else:
            raise _Refused(f"`{node.name}` mixes the units with other dimensions")
        if spec is not None and (len(spec) != len(after) or spec[d] != -1):
            raise _Refused(f"`{node.name}` fixes the size of the unit dimension (write -1 there, or flatten)")
        return _Tag(d, tuple(_Seg(s.space, s.offset * factor, s.repeat * factor) for s in tag.segs))

    def _permute(self, node: fx.Node) -> _Tag:
        tag = self._input_tag(node)
        rank = len(_shape(node.args[0]))
        rest = list(node.args[1:]) or list(node.kwargs.values())
        if node.target in (torch.transpose, "transpose"):
            pair = [d % rank for d in rest[:2]]
            order = list(range(rank))
            order[pair[0]], order[pair[1]] = pair[1], pair[0]
        else:
            order = [d % rank for d in (rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest)]
        return _Tag(order.index(tag.dim), tag.segs)

    def _cat(self, node: fx.Node) -> _Tag:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim %= len(_shape(node))  # type: ignore[operator]
        segs: list[_Seg] = []
        offset = 0
        for t in tensors:  # type: ignore[union-attr]
            tag = self.tags.get(t)
            if tag is not None:
                if tag.dim != dim:
                    raise _Refused(f"`{node.name}` concatenates along a dimension other than the units'")
                segs += [_Seg(s.space, s.offset + offset, s.repeat) for s in tag.segs]
            offset += _shape(t)[dim]
        return _Tag(dim, tuple(segs))

    def _size(self, node: fx.Node) -> None:
        if node.target != "size":
            return None
        index = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if index is None:
            self.shape_reads[node] = node.args[0]  # type: ignore[assignment]
        elif index % len(_shape(node.args[0])) == self.tags[node.args[0]].dim:  # type: ignore[index, operator]
            raise _Refused(f"`{node.name}` reads the size of the unit dimension")
        return None

    def _use_shape(self, node: fx.Node, reads: list[fx.Node]) -> None:
        source = self.shape_reads[reads[0]]
        positions = list(range(len(_shape(source))))
        index = node.args[1] if len(node.args) > 1 else None
        if node.target is operator.getitem and len(reads) == 1 and isinstance(index, (int, slice)):
            picked = positions[index] if isinstance(index, slice) else [positions[index]]
            if self.tags[source].dim not in picked or not node.users:
                return None
        raise _Refused(f"`{node.name}` uses the size of the unit dimension")


def _view_spec(node: fx.Node) -> list:
    rest = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
