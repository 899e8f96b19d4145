"""What a plan costs besides its layers' weights, and what the delivered model truly costs. No Lightning import.

- :func:`fixed_bytes`: every ``state_dict`` entry the plan does not choose for (biases, norms, buffers, layers not
  selected), at the element size ``save_quantized`` writes them with.
- :func:`write_file`: the one writer of what ``compress()`` delivered (``save_quantized``, or ``save_float`` for a
  plan that keeps every layer float); :func:`file_bytes`: the size of that file, measured by writing it to a
  temporary directory: the safetensors header (its JSON metadata included) is only known exactly once written, so
  a plan reserves the header measured on the cheapest plan's file, and the delivered file is measured.
- :func:`positions`: per layer, how many times per example each weight is applied (a Linear: once per token; a
  convolution: once per output position), from one forward pass; an embedding lookup has no multiply-accumulates.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.quantization.calibration import run_with_hooks
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.export import save_float, save_quantized
from lightning_compress.structure.macs import count_macs


def aliases(model: nn.Module, keys: Mapping[str, str]) -> dict[str, int]:
    """Per layer (name -> weight key), how many other ``state_dict`` keys are the very same tensor."""
    state = model.state_dict(keep_vars=True)
    count: dict[int, int] = {}
    for value in state.values():
        count[id(value)] = count.get(id(value), 0) + 1
    return {name: count[id(state[key])] - 1 for name, key in keys.items()}


def fixed_bytes(model: nn.Module, weight_keys: Mapping[str, str]) -> int:
    """Bytes of every ``state_dict`` entry that is not one of the planned weights nor tied to one."""
    state = model.state_dict(keep_vars=True)
    planned = {id(state[key]) for key in weight_keys.values()}
    return sum(v.numel() * v.element_size() for v in state.values() if id(v) not in planned)


def write_file(model: nn.Module, path: str | os.PathLike[str], *, run_id: str | None = None) -> Path:
    """Write what :func:`~lightning_compress.adaptive.compress.compress` delivered, atomically: the codes the model
    carries (``save_quantized``), or, where the plan kept every layer float and there are none, its float weights
    (``save_float``). ``load_compressed`` reads either back. A model whose carried codes are stale is refused, never
    written as float."""
    if carried(model) is None:
        return save_float(model, path, run_id=run_id)
    return save_quantized(model, path, run_id=run_id)


def file_bytes(model: nn.Module) -> int:
    """Bytes of the file :func:`write_file` writes for ``model`` as it is, measured by writing it."""
    with tempfile.TemporaryDirectory() as folder:
        return write_file(model, os.path.join(folder, "plan.safetensors")).stat().st_size


def batch_size(batch: Any) -> int:
    """The first dimension of the batch's first tensor (1 when it has none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    return next((batch_size(v) for v in values if isinstance(v, (Tensor, Mapping, tuple, list))), 1)


def positions(model: nn.Module, layers: Mapping[str, nn.Module], batch: Any,
              forward: Callable[[nn.Module, Any], Any]) -> dict[str, float]:
    """Per layer, the number of times each weight is used per example (see the module docstring)."""
    counts: dict[str, float] = {name: 0.0 for name in layers}

    def hook(name: str, module: nn.Module) -> Callable[..., None]:
        def record(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(module, nn.Embedding):
                return
            if isinstance(module, nn.MultiheadAttention):  # in_proj: once per query, key and value token
                counts[name] += sum(t.numel() / module.embed_dim for t in args[:3] if isinstance(t, Tensor)) / 3
                return
            out = output if isinstance(output, Tensor) else None
            channels = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
            if out is not None and channels:
                counts[name] += out.numel() / channels
        return record

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    training = model.training
    model.eval()
    try:
        run_with_hooks(model, batch, forward, handles)
    finally:
        model.train(training)
    size = batch_size(batch)
    return {name: count / size for name, count in counts.items()}


def dense_macs(weights: Mapping[str, Tensor], where: Mapping[str, float]) -> int:
    """The planned layers' multiply-accumulates per example with every weight kept."""
    return round(sum(weights[name].numel() * where[name] for name in weights))


class _Fed(nn.Module):
    """``model`` fed ``batch`` by ``forward``, as a module :func:`~lightning_compress.structure.macs.count_macs` can
    run (it ignores the placeholder input it is called with)."""

    def __init__(self, model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model, self.batch, self.run = model, batch, forward

    def forward(self, *_: Any) -> Any:
        return self.run(self.model, self.batch)


def model_macs(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any]) -> int:
    """Multiply-accumulates per example of one forward of ``batch`` (every operation, dense, attention included:
    :func:`~lightning_compress.structure.macs.count_macs`)."""
    return count_macs(_Fed(model, batch, forward), torch.zeros(1)) // batch_size(batch)


def delivered_macs(weights: Mapping[str, Tensor], where: Mapping[str, float], other: int) -> int:
    """MACs per example of the model as it is: each planned weight's nonzero entries times its positions."""
    return other + round(sum(int(torch.count_nonzero(w)) * where[n] for n, w in weights.items()))
