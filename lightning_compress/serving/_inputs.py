"""What goes into and comes out of an exported graph: named inputs, dynamic axes, the outputs the user asked for.
No Lightning.

``export_onnx`` takes one example as a tensor (the graph input is called ``input``, as before), a tuple of tensors
(positional arguments, named after the parameters of ``model.forward``) or a dict of keyword tensors (named after
its keys: ``input_ids``, ``attention_mask``, ...). :class:`Exported` wraps the model so that the exporter always
sees positional tensors in and a tuple of the selected tensors out, whatever the model takes and returns (a tensor,
a tuple, a dict or a Hugging Face ``ModelOutput``).

Dynamic axes, per input: an integer (token) input has its batch and sequence axes (dims 0 and 1) dynamic, a float
input its batch axis; ``dynamic_axes=`` overrides any input. Every check here runs before anything is exported.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

OutputKey = int | str


@dataclass
class Inputs:
    """One example, flattened: graph input names, tensors, and whether the model takes them as keywords."""

    argument: str  # the argument's name in messages: `example_inputs` or `example_input`
    names: list[str]
    tensors: list[Tensor]
    keywords: bool
    single: bool  # a lone tensor (graph input "input", output "output": the names before token inputs)

    def feed(self, tensors: Sequence[Tensor]) -> dict[str, Any]:
        """The ONNX Runtime feed for ``tensors`` (integer dtypes kept, float as float32)."""
        return {name: _numpy(t) for name, t in zip(self.names, tensors)}

    def call(self, model: nn.Module, tensors: Sequence[Tensor]) -> Any:
        if self.keywords:
            return model(**dict(zip(self.names, tensors)))
        return model(*tensors)

    def shapes(self) -> str:
        return ", ".join(f"{n}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                         for n, t in zip(self.names, self.tensors))


def _numpy(t: Tensor) -> Any:
    t = t.detach().cpu()
    return (t if not t.is_floating_point() else t.float()).numpy()


def prepare(model: nn.Module, example: Any, argument: str) -> Inputs:
    """Check and name the example: a tensor, a tuple / list of tensors or a dict of keyword tensors."""
    if isinstance(example, Tensor):
        return Inputs(argument, ["input"], [example.detach().cpu()], keywords=False, single=True)
    if isinstance(example, Mapping):
        items = list(example.items())
        keywords = True
    elif isinstance(example, (tuple, list)):
        params = _positional_names(model)
        items = [(params[i] if i < len(params) else f"input_{i}", v) for i, v in enumerate(example)]
        keywords = False
    else:
        raise TypeError(f"`{argument}` must be a torch.Tensor, a tuple of tensors (positional arguments) or a dict "
                        f"of keyword tensors (e.g. input_ids, attention_mask); got {type(example).__name__}")
    if not items:
        raise ValueError(f"`{argument}` is empty; allowed: at least one input tensor")
    for name, value in items:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"`{argument}` has the key {name!r}; allowed: keyword-argument names (strings)")
        if not isinstance(value, Tensor):
            raise TypeError(f"`{argument}`[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
    return Inputs(argument, [n for n, _ in items], [v.detach().cpu() for _, v in items], keywords, single=False)


def _positional_names(model: nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_finite(argument: str, names: Sequence[str], tensors: Sequence[Tensor], where: str = "") -> None:
    """Refuse NaN / inf in float inputs: the output check would compare garbage with garbage."""
    for name, t in zip(names, tensors):
        if t.is_floating_point() and not bool(t.isfinite().all()):
            nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
            raise ValueError(f"`{argument}`{where} input {name!r} holds {nan} NaN and {inf} inf values (shape "
                             f"{tuple(t.shape)}); allowed: finite inputs only")


def batches_like(inputs: Inputs, data: Tensor | Iterable[Any]) -> list[list[Tensor]]:
    """``calibration_data`` as lists of tensors in the example's order: a tensor (split into batches of 64) or
    batches shaped like the example (a tensor or ``(inputs, targets, ...)`` for a one-tensor example, a dict with
    at least the example's keys, a tuple whose first items are the example's tensors)."""
    if isinstance(data, Tensor):
        if not inputs.single:
            raise TypeError(f"`calibration_data` is one tensor but `{inputs.argument}` has {len(inputs.names)} inputs "
                            f"({', '.join(inputs.names)}); pass an iterable of batches shaped like it")
        data = list(data.split(64))
    out = []
    for i, batch in enumerate(data):
        out.append(_one_batch(inputs, batch, i))
        check_finite("calibration_data", inputs.names, out[-1], f" batch {i}")
    if not out:
        raise ValueError("`calibration_data` is empty; allowed: at least one batch of inputs")
    return out


def _one_batch(inputs: Inputs, batch: Any, i: int) -> list[Tensor]:
    if inputs.keywords:
        if not isinstance(batch, Mapping) or any(name not in batch for name in inputs.names):
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise TypeError(f"`calibration_data` batch {i} must be a dict with the keys {inputs.names}, got {got}")
        values = [batch[name] for name in inputs.names]
    elif inputs.single:
        values = [batch[0] if isinstance(batch, (tuple, list)) and batch else batch]
    else:
        if not isinstance(batch, (tuple, list)) or len(batch) < len(inputs.names):
            raise TypeError(f"`calibration_data` batch {i} must be a tuple starting with {len(inputs.names)} tensors "
                            f"({', '.join(inputs.names)}), got {type(batch).__name__}")
        values = list(batch[: len(inputs.names)])
    for name, value in zip(inputs.names, values):
        if not isinstance(value, Tensor):
            raise TypeError(f"`calibration_data` batch {i} input {name!r} must be a torch.Tensor, got "
                            f"{type(value).__name__}")
    return [v.detach().cpu() for v in values]


# ------------------------------------------------------------------------------------------------ outputs
def _items(output: Any) -> list[tuple[str, Any]]:
    """The top-level (name, value) pairs of a model's output, in order."""
    if isinstance(output, Tensor):
        return [("output", output)]
    if isinstance(output, Mapping):  # dict, and Hugging Face ModelOutput (an OrderedDict of its non-None fields)
        return [(str(k), v) for k, v in output.items()]
    if isinstance(output, (tuple, list)):
        return [(f"output_{i}", v) for i, v in enumerate(output)]
    raise TypeError(f"the model returned {type(output).__name__}; export_onnx needs a tensor, a tuple, a dict or a "
                    "ModelOutput of tensors")


def select(output: Any, wanted: Sequence[OutputKey] | None) -> tuple[list[str], list[int]]:
    """Names and positions (in :func:`_items` order) of the outputs to export: ``wanted`` names or indices, default
    the first tensor."""
    items = _items(output)
    tensors = [i for i, (_, v) in enumerate(items) if isinstance(v, Tensor)]
    if not tensors:
        raise TypeError(f"the model returned no tensor at its top level (got {[n for n, _ in items]})")
    if wanted is None:
        return [items[tensors[0]][0]], [tensors[0]]
    names = [n for n, _ in items]
    positions = []
    for key in wanted:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"`outputs` must hold output names or indices, got {key!r}")
        index = names.index(key) if isinstance(key, str) and key in names else key
        if not isinstance(index, int) or not 0 <= index < len(items) or not isinstance(items[index][1], Tensor):
            raise ValueError(f"`outputs` asks for {key!r}; the model returns {len(items)} outputs: "
                             f"{[(i, n, type(v).__name__) for i, (n, v) in enumerate(items)]}; allowed: names or "
                             "indices of tensors")
        positions.append(index)
    if len(set(positions)) != len(positions):
        raise ValueError(f"`outputs`={list(wanted)!r} names one output twice")
    return [names[i] for i in positions], positions


def pick(output: Any, positions: Sequence[int]) -> list[Tensor]:
    items = _items(output)
    return [items[i][1] for i in positions]


class Exported(nn.Module):
    """``model`` seen by the exporter: positional tensors in, the selected outputs out (a tuple)."""

    def __init__(self, model: nn.Module, inputs: Inputs, positions: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self._inputs, self._positions = inputs, list(positions)

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(pick(self._inputs.call(self.model, tensors), self._positions))


def check_outputs_arg(outputs: Any) -> list[OutputKey] | None:
    if outputs is None:
        return None
    if isinstance(outputs, (int, str)) and not isinstance(outputs, bool):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs:
        return list(outputs)
    raise TypeError(f"`outputs` must be an output name, an index, or a non-empty list of them, got {outputs!r}")


# ------------------------------------------------------------------------------------------------ dynamic axes
def axes(inputs: Inputs, override: Mapping[str, Any] | None) -> dict[str, dict[int, str]]:
    """Per input: integer inputs dims 0 (batch) and 1 (sequence), float inputs dim 0, and dim 1 too when an
    integer input has a sequence of that length (a float mask or per-token values go with the tokens); ``override``
    per name (a list of dims, named batch / sequence / ``<input>_dim<d>``, or a dim -> name dict; an empty one makes
    the input static). Inputs sharing a name must share that size."""
    tokens = {t.shape[1] for t in inputs.tensors if not t.is_floating_point() and t.dim() >= 2}
    result: dict[str, dict[int, str]] = {}
    for name, t in zip(inputs.names, inputs.tensors):
        if t.dim() == 0:
            result[name] = {}
        elif t.dim() == 1 or (t.is_floating_point() and t.shape[1] not in tokens):
            result[name] = {0: "batch"}
        else:
            result[name] = {0: "batch", 1: "sequence"}
    if override is None:
        return result
    if not isinstance(override, Mapping):
        raise TypeError(f"`dynamic_axes` must be a dict of input name -> dims, got {type(override).__name__}")
    for name, dims in override.items():
        if name not in result:
            raise ValueError(f"`dynamic_axes` names the input {name!r}; the inputs are {inputs.names}")
        ndim = inputs.tensors[inputs.names.index(name)].dim()
        default = {0: "batch", 1: "sequence"}
        given = dict(dims) if isinstance(dims, Mapping) else {d: default.get(d, f"{name}_dim{d}") for d in dims}
        if any(not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < ndim for d in given):
            raise ValueError(f"`dynamic_axes`[{name!r}]={dims!r}: dims must be integers in [0, {ndim - 1}]")
        result[name] = {int(d): str(label) for d, label in given.items()}
    return result


def output_axes(inputs: Inputs, in_axes: Mapping[str, Mapping[int, str]], out: Tensor) -> dict[int, str]:
    """An output's dynamic dims: dim 0 is the batch, and a later dim whose size is a dynamic input dim's (the
    sequence of ``last_hidden_state`` or of ``(batch, sequence)`` start logits) takes that dim's name. Naming a dim
    that happens to have that size only loses a static shape annotation; missing one makes ORT warn on every run."""
    sizes: dict[int, str] = {}
    for name, t in zip(inputs.names, inputs.tensors):
        for dim, label in in_axes[name].items():
            if dim > 0:
                sizes.setdefault(t.shape[dim], label)
    found = {0: "batch"} if out.dim() > 0 and any(0 in a for a in in_axes.values()) else {}
    for dim in range(1, out.dim()):
        if out.shape[dim] in sizes:
            found[dim] = sizes[out.shape[dim]]
    return found


def probe(inputs: Inputs, in_axes: Mapping[str, Mapping[int, str]]) -> list[Tensor] | None:
    """The example at other sizes along its dynamic axes (the batch one longer, every other dynamic axis one shorter,
    or longer when it has one entry), so the check proves the graph runs at a shape it was not traced at; None
    when nothing is dynamic. Inputs sharing an axis name change together."""
    sizes: dict[str, int] = {}
    for name, t in zip(inputs.names, inputs.tensors):
        for dim, label in in_axes[name].items():
            sizes.setdefault(label, t.shape[dim] + 1 if label == "batch" or t.shape[dim] < 2 else t.shape[dim] - 1)
    if not sizes:
        return None
    out = []
    for name, t in zip(inputs.names, inputs.tensors):
        for dim, label in in_axes[name].items():
            size = sizes[label]
            if size <= t.shape[dim]:
                t = t.narrow(dim, 0, size)
            else:  # repeat the last slice
                t = torch.cat([t, t.narrow(dim, t.shape[dim] - 1, 1).expand(
                    *[size - t.shape[dim] if d == dim else -1 for d in range(t.dim())])], dim)
        out.append(t.contiguous())
    return out


# ------------------------------------------------------------------------------------------------ the dry run
def first_layer(model: nn.Module) -> str:
    """What the model's first weighted layer expects, for error messages."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return f"its first layer {name!r} (Linear) expects inputs whose last dim is {module.in_features}"
        if isinstance(module, nn.modules.conv._ConvNd):
            return (f"its first layer {name!r} ({type(module).__name__}) expects {module.in_channels} input "
                    "channels")
        if isinstance(module, nn.Embedding):
            return (f"its first layer {name!r} (Embedding) expects integer ids in [0, {module.num_embeddings - 1}]")
    return "it has no Linear, Conv or Embedding layer to say what it expects"


@torch.no_grad()
def dry_run(model: nn.Module, inputs: Inputs) -> Any:
    """The model once on the example in PyTorch; a failure is the example's fault, said as such."""
    try:
        return inputs.call(model, inputs.tensors)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"`{inputs.argument}` ({inputs.shapes()}) cannot go through the model: {err}; "
                         f"{first_layer(model)}") from err
