"""Record what one real forward pass does, as a ``torch.fx.Graph`` with the concrete shape of every tensor.

``torch.fx.symbolic_trace`` runs the forward on proxies: it stops at data-dependent control flow (Lightning's demo
``Transformer``) and does not look inside ``torch.nn`` modules. :func:`record` instead runs the model once on the
example input under a ``TorchFunctionMode`` and forward hooks, so Python control flow takes its real branch and
every container (``nn.TransformerEncoderLayer``, a Hugging Face ``BertLayer``) is entered. What is recorded:

- a ``call_module`` node for each call of a module the analysis knows as a whole (``isinstance`` of a type in
  ``opaque``: Linear / Conv / BatchNorm / LayerNorm / MultiheadAttention / activations ...); what runs inside it is
  not recorded. Every other module is transparent: the torch functions its forward calls are recorded;
- a ``call_function`` node (``torch.cat``, ``F.relu``, ``operator.add`` for ``x + y``, ``operator.getitem`` for
  ``x[...]``) or ``call_method`` node (``x.view(...)``, ``x.relu()``) for every torch function / Tensor method
  called outside those modules, with its real arguments (tensors replaced by the nodes that made them);
- ``placeholder`` nodes for the inputs, ``get_attr`` nodes for parameters, buffers and other tensors the forward
  reads, ``operator.getitem`` nodes for each tensor of a tuple result, and an ``output`` node over every tensor of
  the result (any nesting: tuples, dicts, Hugging Face ``ModelOutput``).

``node.meta["shape"]`` holds each tensor's real shape. Integers derived from shapes are plain Python values by the
time they reach a ``view``: what they came from is not recorded (the dependency analysis therefore verifies its
conclusions by a trial compaction). The model runs in eval mode with gradients enabled and the fused fast paths of
``torch.backends.mha`` off (they would hide ``linear1`` / ``linear2`` inside one kernel), modes restored afterwards.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

# Tensor dunder methods -> what fx would record for the same Python expression
_DUNDER: dict[str, tuple[Callable[..., Any] | str, bool]] = {
    "__add__": (operator.add, False), "__radd__": (operator.add, True), "__iadd__": (operator.add, False),
    "__sub__": (operator.sub, False), "__isub__": (operator.sub, False), "__rsub__": ("rsub", False),
    "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True), "__imul__": (operator.mul, False),
    "__truediv__": (operator.truediv, False), "__itruediv__": (operator.truediv, False),
    "__rtruediv__": ("rdiv", False), "__rdiv__": ("rdiv", False), "__matmul__": (torch.matmul, False),
    "__getitem__": (operator.getitem, False),
}  # fmt: skip


def as_call(example_input: Any, model: nn.Module | None = None) -> tuple[tuple, dict]:
    """The example input as ``(args, kwargs)``: a tensor, a tuple / list of positional arguments, or a dict of
    keyword arguments (as Lightning's ``example_input_array`` allows). With ``model``, floating-point tensors are
    moved to the device and dtype of the model's first floating-point parameter."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    if isinstance(example_input, torch.Tensor):
        args, kwargs = (example_input,), {}
    elif isinstance(example_input, (tuple, list)):
        args, kwargs = tuple(example_input), {}
    elif isinstance(example_input, Mapping):
        args, kwargs = (), dict(example_input)
    else:
        raise TypeError(
            f"`example_input` must be a tensor, a tuple of positional arguments or a dict of keyword arguments, "
            f"got {type(example_input).__name__}"
        )
    reference = next((p for p in model.parameters() if p.is_floating_point()), None) if model is not None else None
    if reference is None:
        return args, kwargs

    def move(a: Any) -> Any:
        return a.to(reference.device, reference.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


@contextmanager
def analysis_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on, MHA fast paths off; every module's mode and the fast-path flag restored after."""
    modes = {m: m.training for m in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, mode in modes.items():
            module.training = mode


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module, opaque: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.nodes: dict[int, fx.Node] = {}
        self.alive: list[Any] = []  # keeps recorded tensors alive, so that no id is reused during the pass
        self.depth = 0  # > 0 while inside an opaque module
        self.names = {id(t): n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
        self.opaque = {m: n for n, m in model.named_modules() if opaque(m)}

    # ------------------------------------------------------------------ tensors <-> nodes
    def node(self, tensor: torch.Tensor) -> fx.Node:
        found = self.nodes.get(id(tensor))
        if found is None:  # a parameter, a buffer, or a tensor the forward made without a torch function
            name = self.names.get(id(tensor), f"_tensor_{len(self.nodes)}")
            found = self.bind(self.graph.get_attr(name), tensor)
        return found

    def bind(self, node: fx.Node, value: Any) -> fx.Node:
        if isinstance(value, torch.Tensor):
            node.meta["shape"] = tuple(value.shape)
            self.nodes[id(value)] = node
            self.alive.append(value)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    self.bind(self.graph.call_function(operator.getitem, (node, i)), item)
        return node

    def mapped(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.node(value)
        if isinstance(value, (tuple, list)):
            return type(value)(self.mapped(v) for v in value) if type(value) in (tuple, list) else tuple(
                self.mapped(v) for v in value
            )
        if isinstance(value, dict):
            return {k: self.mapped(v) for k, v in value.items()}
        return value

    # ------------------------------------------------------------------ recording
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and _touches_tensor(out):
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        qualname = getattr(func, "__qualname__", "")
        name = getattr(func, "__name__", "")
        if name in _DUNDER:
            target, swap = _DUNDER[name]
            args = (args[1], args[0], *args[2:]) if swap else args
            op = "call_method" if isinstance(target, str) else "call_function"
        elif qualname.split(".")[0] in ("TensorBase", "Tensor") and name:
            op, target = "call_method", name
        else:
            op, target = "call_function", func
        node = self.graph.create_node(op, target, self.mapped(args), self.mapped(kwargs))
        self.bind(node, out)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.depth == 0:
            module.__dict__["_lc_call"] = (self.mapped(args), self.mapped(kwargs))  # popped by post_hook
        self.depth += 1

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            call_args, call_kwargs = module.__dict__.pop("_lc_call", ((), {}))
            self.bind(self.graph.call_module(self.opaque[module], call_args, call_kwargs), out)


def _touches_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def record(model: nn.Module, example_input: Any, opaque: Callable[[nn.Module], bool]) -> fx.Graph:
    """One real forward pass of ``model`` on ``example_input`` as a graph (see the module docstring)."""
    args, kwargs = as_call(example_input, model)
    recorder = _Recorder(model, opaque)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            recorder.bind(recorder.graph.placeholder(f"input_{i}"), a)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            recorder.bind(recorder.graph.placeholder(f"input_{k}"), v)
    handles = []
    try:
        for module in recorder.opaque:
            handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True, always_call=True))
        with analysis_mode(model), recorder:
            out = model(*args, **kwargs)
        leaves = tree_leaves(dict(out) if isinstance(out, Mapping) else out)
        leaves = [t for t in leaves if isinstance(t, torch.Tensor)]
        recorder.graph.output(tuple(recorder.node(t) for t in leaves))
    finally:
        for handle in handles:
            handle.remove()
        for module in recorder.opaque:
            module.__dict__.pop("_lc_call", None)
    return recorder.graph
