"""Which units of each layer can be removed, and what must shrink with them, from one real forward pass.

A *unit* is an output feature of a ``Linear`` (a weight row), an output channel of a ``Conv{1,2,3}d``, or a row of
an attention module's ``in_proj_weight`` (``nn.MultiheadAttention``; the rows come as three *parts* q, k, v that
share their units, and a head's ``head_dim`` units go together: a *block*). Removing a unit also removes its
entries in channel-wise *followers* (BatchNorm) and the input columns / channels of the *consumers* that read it.
Layers are recognised by ``isinstance`` (``NonDynamicallyQuantizableLinear`` is a ``Linear``).

:func:`find_unit_groups` records one forward pass on the example input (:mod:`lightning_compress.structure.trace`:
real execution, so Python control flow takes its real branch and ``torch.nn`` containers are entered), then
follows every tensor that holds units (:mod:`lightning_compress.structure.walk`, the modules, and
:mod:`lightning_compress.structure.operations`, torch functions and Tensor methods):

- element-wise activations and dropout, scaling by a number or by a tensor that is the same for every unit,
  pooling and ``mean``/``sum``/``amax`` over other dimensions, ``permute``/``transpose``, ``view``/``reshape``/
  ``flatten``/``squeeze`` that keep the units' dimension, merge it with the dimensions after it (``repeat``) or split
  it into heads (``(B, T, H*hd) -> (B, T, H, hd)``: the units then go in blocks of ``hd``);
- BatchNorm with affine parameters (a follower); concatenation along the units (consumer entries get an offset);
- residual ``+`` / ``-`` of two tensors with the same layout: their producers are ``coupled`` (one set of units);
- per-head products (``q @ k.transpose``, ``probs @ v``, ``F.scaled_dot_product_attention``): the q, k and v
  producers are coupled, a head goes from all of them; a head whose v rows are zero outputs zero even though its
  scores pass a mask and a softmax, so removing it is exact;
- ``nn.MultiheadAttention``: its heads form a group of their own (consumer: ``out_proj``'s columns); its output is
  ``out_proj``'s units.

Anything else that reads the units marks the whole set ``prunable=False`` with a reason: the model output,
LayerNorm and other modules, ``sigmoid`` and other maps of 0 to non-zero, adding a constant or a tensor that holds
no units, products of tensors that both hold units except per head, indexing, layers called twice, sharing
parameters (tied weights) or parametrized, grouped convolutions.

What the recording cannot see (a size read from the units' dimension and used as a number, a literal size in a
``view``) is caught by *verification* (``verify=True``, the default): every prunable set is removed one block on a
copy of the model and the outputs compared with the masked model's; a set that changes them is refused with the
difference as the reason. The result is final before the first training step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lightning_compress.core.modules import weight_of
from lightning_compress.structure.attention import ATTENTION_TYPES, attention_layout
from lightning_compress.structure.kinds import FOLLOWER_TYPES, OPAQUE_TYPES, PRODUCER_TYPES
from lightning_compress.structure.trace import as_call, record
from lightning_compress.structure.walk import Walk

DEAD_CODE = "dead code: it runs, but the model's output does not depend on it"

__all__ = [
    "FOLLOWER_TYPES", "PRODUCER_TYPES", "UnitGroup", "as_args", "find_unit_groups", "num_units", "prunability_table",
    "unit_weight", "unit_weight_name",
]


@dataclass
class UnitGroup:
    """The units of ``producer`` and everything that holds an entry per unit.

    ``num_units`` counts the rows of :func:`unit_weight` (for attention ``3 * heads * head_dim``); a keep-mask over
    the units has that length. The rows hold ``parts`` copies of ``num_units // parts`` units (q, k, v) and units
    go in blocks of ``block`` (a head's ``head_dim``): a mask must keep or drop a block in every part together.
    ``consumers`` count in units of one part.
    """

    producer: str  # qualified name of the Linear / Conv / attention module, relative to the module analysed
    num_units: int
    followers: list[str] = field(default_factory=list)  # BatchNorms: weight, bias, running stats go with the unit
    consumers: list[tuple[str, int, int]] = field(default_factory=list)  # (name, repeat, offset) of input columns
    prunable: bool = True
    reason: str = ""  # why not prunable
    coupled: list[str] = field(default_factory=list)  # producers whose units are the same units (residual, q/k/v)
    block: int = 1  # units go in blocks this long (attention heads: head_dim)
    parts: int = 1  # the rows repeat the units this many times (attention in_proj_weight: 3)
    macs: float = 0.0  # multiply-accumulates of the producer's calls in the example forward pass
    attention_macs: float = 0.0  # MACs of the coupled set's per-head products; they shrink with its units
    fan_in: int = 0  # the producer's input width (columns of its weight)
    dead: bool = False  # it runs, but nothing the model returns depends on its output (dead code, not pruned)

    @property
    def num_blocks(self) -> int:
        """How many removable blocks (units, or heads) the group has."""
        return self.num_units // self.parts // self.block


def find_unit_groups(model: nn.Module, example_input: Any, *, verify: bool = True) -> dict[str, UnitGroup]:
    """A :class:`UnitGroup` for every Linear / Conv{1,2,3}d and multi-head attention module of ``model``, keyed by
    its qualified name. ``example_input``: a tensor, a tuple of positional arguments or a dict of keyword
    arguments for ``model``'s forward. ``verify``: confirm every prunable set by a trial removal (see above)."""
    as_call(example_input)  # the type check, before any work
    names = [n for n, m in model.named_modules() if isinstance(m, (*PRODUCER_TYPES, *ATTENTION_TYPES))]
    try:
        graph = record(model, example_input, lambda m: isinstance(m, OPAQUE_TYPES))
    except Exception as err:
        message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        reason = (f"the forward pass of {type(model).__name__} on the example input raised "
                  f"{type(err).__name__}: {message}")
        return {n: _unseen(model, n, reason) for n in names}
    walk = Walk(model, graph)
    for node in graph.nodes:
        walk.step(node)
    groups = {n: _group(walk, model, n) for n in names}
    for name in _dead_producers(graph, groups):
        groups[name].prunable, groups[name].dead = False, True
        groups[name].reason = DEAD_CODE
    if verify:
        from lightning_compress.structure.compaction import verify_groups

        verify_groups(model, example_input, groups)
    return groups


def _dead_producers(graph: fx.Graph, groups: dict[str, UnitGroup]) -> list[str]:
    """The analysed layers that the forward pass calls but whose output no returned tensor depends on (a BERT
    pooler when the model mean-pools): their units are not "pruned", they are dead code."""
    output = [n for n in graph.nodes if n.op == "output"]
    live: set[fx.Node] = set()
    stack = list(output)
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    reached = {str(n.target) for n in live if n.op == "call_module"}
    dead = [n for n in groups if n in called - reached]
    return dead + [f"{n}.out_proj" for n in dead if f"{n}.out_proj" in groups]  # inside a dead attention


def unit_weight(module: nn.Module) -> torch.Tensor:
    """The parameter whose rows are the module's units: ``weight``, or ``in_proj_weight`` for attention."""
    return module.in_proj_weight if isinstance(module, ATTENTION_TYPES) else weight_of(module)


def unit_weight_name(module: nn.Module) -> str:
    """The name of :func:`unit_weight` on its module (``"weight"`` or ``"in_proj_weight"``), for parameter masks."""
    return "in_proj_weight" if isinstance(module, ATTENTION_TYPES) else "weight"


def num_units(module: nn.Module) -> int:
    return int(unit_weight(module).shape[0])


def fan_in(module: nn.Module) -> int:
    if isinstance(module, ATTENTION_TYPES):
        return attention_layout(module)[0]
    return int(weight_of(module).shape[1]) * getattr(module, "groups", 1)


def as_args(example_input: Any, model: nn.Module | None = None) -> tuple:
    """The example input as positional arguments (kept for callers of the earlier API; dicts are refused here,
    :func:`lightning_compress.structure.trace.as_call` takes them)."""
    args, kwargs = as_call(example_input, model)
    if kwargs:
        raise TypeError("`example_input` is a dict of keyword arguments; use `as_call` for it")
    return args


def _unseen(model: nn.Module, name: str, reason: str) -> UnitGroup:
    module = model.get_submodule(name)
    parts, block = (3, attention_layout(module)[2]) if isinstance(module, ATTENTION_TYPES) else (1, 1)
    return UnitGroup(name, num_units(module), prunable=False, reason=reason, parts=parts, block=block,
                     fan_in=fan_in(module))


def _group(walk: Walk, model: nn.Module, name: str) -> UnitGroup:
    if name not in walk.spaces:
        return _unseen(model, name, "not called in the forward pass (unused, or inside a module analysed as a whole)")
    space = walk.spaces[name]
    root = space.root()
    module = walk.modules[name]
    return UnitGroup(
        producer=name,
        num_units=num_units(module),
        followers=list(dict.fromkeys(root.followers)),
        consumers=list(dict.fromkeys(root.consumers)),
        prunable=not root.reasons,
        reason="; ".join(dict.fromkeys(root.reasons)),
        coupled=[p for p in dict.fromkeys(root.producers) if p != name],
        block=root.block,
        parts=space.parts,
        macs=float(walk.macs.get(name, 0.0)),
        attention_macs=float(root.attention_macs),
        fan_in=fan_in(module),
    )


def prunability_table(groups: dict[str, UnitGroup]) -> str:
    """One line per layer: prunable or refused (with why), its units, blocks and coupled layers; for a log."""
    lines = [f"{'layer':<48} {'units':>6} {'blocks':>6}  decision"]
    for name, group in groups.items():
        decision = "prunable" if group.prunable else f"refused: {group.reason}"
        if group.prunable and group.coupled:
            decision += f" (with {', '.join(group.coupled)})"
        lines.append(f"{name:<48} {group.num_units:>6} {group.num_blocks:>6}  {decision}")
    return "\n".join(lines)
