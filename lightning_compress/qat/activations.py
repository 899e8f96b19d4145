"""Activation fake quantization for QAT: uint8 per-tensor on the *inputs* of the quantized layers, the ranges learned
in the same pass as the weights' scales. No Lightning.

Static integer kernels (ONNX ``QLinearConv`` / ``QGemm``) read uint8 activations with one fixed ``(scale, zero
point)`` per tensor. :class:`InputFakeQuantizer` computes exactly what ONNX Runtime's ``QuantizeLinear`` ->
``DequantizeLinear`` pair computes on a layer's input::

    x_hat = (clamp(round(x / s) + z, 0, 255) - z) * s        # round half to even, as ORT

- **how it is attached**: a forward *pre-hook* on the layer module (:func:`attach`), never a wrapper of the
  model's forward, so a forward taking args, kwargs or dicts is untouched. A learning quantizer is also a submodule
  of its layer (:data:`SUBMODULE`) while QAT runs, so that its step is a parameter of the model: DDP, wrapped again
  when QAT starts, all-reduces its gradient like the weights'; its ``state_dict`` entries are not the model's own
  (:func:`strip_keys` takes them out of a checkpoint, whose callback state carries the steps). :func:`detach`
  removes hooks and submodules and returns the ranges.
- **under DDP**: the first-batch range is the min / max over every rank's first batch (all-reduced), so every rank
  starts from the same step; from then on the all-reduced gradients keep them equal.
- **initial range**: min / max of the first batch the layer sees once attached, turned into ``(s, z)`` by the
  export's own :func:`~lightning_compress.serving._graph.uint8_qparams`: at its first step the model computes what
  a static export calibrated on that batch would. (An EMA of min / max was not chosen: it keeps moving the range
  the scale's gradient is trying to set, and one batch is enough for LSQ to start from.)
- **learning**: LSQ (Esser et al. 2020): straight-through ``round``, zero gradient to ``x`` outside the clipping
  range, the step size's gradient scaled by ``1 / sqrt(features * 255)``; but the step is learned as ``log s``: the
  fit's optimizer is usually Adam-type, which moves a parameter by about its learning rate per step whatever its
  size, and activation steps span orders of magnitude (inputs in [0, 0.25] need a step far below a learning rate),
  so a linear ``s`` would move by many times itself within a few dozen steps; ``log s`` moves by a ratio. The zero
  point stays the integer it was initialised to: it is what the integer kernel needs, ``0`` for a ReLU's output
  (which keeps the ReLU absorbable into the previous layer's uint8 output), and scaling ``s`` moves both ends of
  the range together.
- **exactness**: a checkpoint stores ``log s`` itself (:func:`states`, resumed bit for bit); what the model
  carries and the export writes is the float32 ``s = exp(log s)`` the forward used (:func:`ranges`), applied as
  it is by a fixed quantizer (``learn=False``).
- ranges are keyed by the layer's weight ``state_dict`` key (as the weight codes are, in
  :mod:`lightning_compress.quantization.carried`): the range of ``"net.0.weight"`` is that of ``net.0``'s input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_compress.qat.fake_quant import _RoundSTE, _ScaleGrad
from lightning_compress.quantization.activation_ranges import QMAX, QMIN, check_range
from lightning_compress.quantization.activation_ranges import from_entry as from_entry  # compressed.ckpt's reader
from lightning_compress.quantization.activation_ranges import to_entry as to_entry  # and writer
from lightning_compress.serving._graph import uint8_qparams

SUBMODULE = "qat_input_quantizer"  # a learning quantizer's name under its layer while QAT runs
Range = tuple[float, int]  # (scale, zero point) of one layer's input


class InputFakeQuantizer(nn.Module):
    """uint8 fake quantization of one layer's input (see the module docstring). ``log_scale``: the learnable 0-d
    parameter; ``zero_point``: a fixed integer. ``given``: a range ``(scale, zero point)``; ``learn=False`` applies
    it as it is (a delivered model), ``learn=True`` learns from it; ``state``: a checkpoint's ``(log s, zero
    point)`` (:func:`states`), resumed exactly."""

    def __init__(self, given: Range | None = None, learn: bool = True, state: Range | None = None) -> None:
        super().__init__()
        scale, zero_point = given if given is not None else (1.0, 0)
        check_range(scale, zero_point, "the activation range")
        self.fixed = None if learn else torch.tensor(float(scale), dtype=torch.float32)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32), requires_grad=learn)
        self.zero_point = int(zero_point)
        if state is not None:
            with torch.no_grad():
                self.log_scale.fill_(float(state[0]))
            self.zero_point = int(state[1])
        self.initialized = given is not None or state is not None

    def range(self) -> Range:
        """``(scale, zero_point)`` as the forward applies them and the export writes them (float32 scale)."""
        return float(self.effective_scale().detach().cpu()), self.zero_point

    def state(self) -> Range:
        """``(log s, zero_point)``: what resumes this quantizer exactly."""
        return float(self.log_scale.detach().cpu()), self.zero_point

    def effective_scale(self) -> Tensor:
        if self.fixed is not None:
            return self.fixed.to(self.log_scale.device)
        return self.log_scale.exp().clamp(min=torch.finfo(torch.float32).tiny)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        bounds = torch.stack([-x.min(), x.max()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # every rank calls it here
            dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        scale, zero_point = uint8_qparams(float(-bounds[0]), float(bounds[1]))
        self.log_scale.fill_(math.log(scale))
        self.zero_point, self.initialized = zero_point, True

    def forward(self, x: Tensor) -> Tensor:
        if not self.initialized:
            self._initialize(x.detach().float())
        features = max(1, x[0].numel() if x.dim() > 1 else x.numel())
        scale = self.effective_scale()
        if self.fixed is None:
            scale = _ScaleGrad.apply(scale, 1.0 / math.sqrt(features * QMAX))
        codes = torch.clamp(_RoundSTE.apply(x.float() / scale) + self.zero_point, QMIN, QMAX)
        return ((codes - self.zero_point) * scale).to(x.dtype)

    def __call__(self, *args: Any) -> Any:
        if len(args) == 2 and isinstance(args[0], nn.Module):  # called as a forward pre-hook (module, args)
            return self._pre_hook(args[1])
        return super().__call__(*args)

    def _pre_hook(self, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not inputs or not isinstance(inputs[0], Tensor) or not inputs[0].is_floating_point():
            return None
        return (self.forward(inputs[0]), *inputs[1:])


def attach(
    layers: Mapping[str, nn.Module], keys: Mapping[str, str], given: Mapping[str, Range] | None = None,
    learn: bool = True, resumed: Mapping[str, Range] | None = None,
) -> dict[str, InputFakeQuantizer]:
    """An :class:`InputFakeQuantizer` as a forward pre-hook on each of ``layers`` (module name -> module); ``keys``:
    module name -> weight key; ``given``: ranges by weight key (a delivered model's, applied as they are with
    ``learn=False``); ``resumed``: a checkpoint's :func:`states`; a layer with neither is initialised on its first
    batch. Every given range is checked before any hook is added."""
    given, resumed = dict(given or {}), dict(resumed or {})
    for key, (scale, zero_point) in given.items():
        check_range(scale, zero_point, f"activation range of {key!r}")
    for key, (log_scale, zero_point) in resumed.items():
        check_range(math.exp(log_scale), zero_point, f"resumed activation range of {key!r}")
    quantizers = {}
    for name, module in layers.items():
        key = keys[name]
        quantizer = InputFakeQuantizer(given.get(key), learn=learn, state=resumed.get(key)).to(_device(module))
        module.register_forward_pre_hook(quantizer)
        if learn:  # its step a parameter of the model (DDP)
            module.add_module(SUBMODULE, quantizer)
        quantizers[name] = quantizer
    return quantizers


def detach(
    model: nn.Module, quantizers: Mapping[str, InputFakeQuantizer], keys: Mapping[str, str]
) -> dict[str, Range]:
    """Remove the hooks from ``model``'s layers; the ranges by weight key (a quantizer never run, so never
    initialised, has none). The hooks are found by identity in each layer's pre-hooks (no handle is kept: a
    ``deepcopy`` of the model copies its hooks, and a copied handle would point at the original's); the
    submodules :func:`attach` added go too."""
    modules = dict(model.named_modules())
    for name, quantizer in quantizers.items():
        hooks = modules[name]._forward_pre_hooks
        for hook_id in [i for i, hook in hooks.items() if hook is quantizer]:
            del hooks[hook_id]
        if modules[name]._modules.get(SUBMODULE) is quantizer:
            del modules[name]._modules[SUBMODULE]
    return ranges(quantizers, keys)


def strip_keys(state: dict[str, Any]) -> None:
    """Remove, in place, the entries of the quantizers :func:`attach` made submodules from a model's
    ``state_dict``: a checkpoint keeps the model's own keys."""
    for key in [k for k in state if f"{SUBMODULE}." in k and (k.startswith(SUBMODULE) or f".{SUBMODULE}." in k)]:
        del state[key]


def ranges(quantizers: Mapping[str, InputFakeQuantizer], keys: Mapping[str, str]) -> dict[str, Range]:
    """The current ranges ``(scale, zero point)`` by weight key, of the initialised quantizers."""
    return {keys[name]: q.range() for name, q in quantizers.items() if q.initialized}


def states(quantizers: Mapping[str, InputFakeQuantizer], keys: Mapping[str, str]) -> dict[str, Range]:
    """``(log s, zero point)`` by weight key, of the initialised quantizers: what a checkpoint stores."""
    return {keys[name]: q.state() for name, q in quantizers.items() if q.initialized}


def _device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
