"""Narrower widths inside a latency plan: once the units and the int8 layers are chosen for the latency, the file's
bytes go to the widths each layer can take without changing how fast the graph runs. No Lightning import.

Which widths, by how ``export_onnx`` serves them (``activations="static"``, :mod:`lightning_compress.serving`):

- a layer the latency plan runs int8: per-channel symmetric codes of fewer bits fit the same int8 operator
  (``QLinearConv`` / ``QGemm``; the codes are only smaller), so it may take 2, 3, 4 or 6 bits at the time its int8
  row measured (a Linear only 6: at 4 bits or fewer the export routes it to ``MatMulNBits``, another operator);
- a Linear the plan left float: weight-only ``MatMulNBits`` (per-channel codes of at most 4 bits, or per-group codes
  of any width), float activations, timed as its float row;
- a convolution the plan left float stays float: its per-group codes are served on ``DequantizeLinear`` (which ORT
  does not fold into the convolution's prepacked weights) and per-channel ones on ``QLinearConv`` between float
  layers, both slower than the float convolution when measured on the digits CNN (README, "Compress to a budget").

The choice is the size path's knapsack (:class:`~.plan.Problem`) on the compacted model: candidates of
:mod:`.candidates` scored with the diagonal Fisher of the compacted model (:mod:`.fisher`), the header reserved as
measured on the cheapest plan's file. The delivered model is then timed, written and counted like every other plan
(:func:`~.latency_delivery.deliver`): nothing here is trusted to hold a cap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_compress.adaptive.candidates import WIDTHS, Candidate, layer_candidates
from lightning_compress.adaptive.costs import aliases, file_bytes, fixed_bytes
from lightning_compress.adaptive.fisher import diagonal_fisher
from lightning_compress.adaptive.int8_latency import INT8
from lightning_compress.adaptive.plan import Problem
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.quantization.carried import attach
from lightning_compress.quantization.coverage import QUANT_MODULE_TYPES, layer_weight, select_layers, weight_key
from lightning_compress.quantization.layer import record_layer
from lightning_compress.quantization.primitives import quantize_tensor

SOURCE = "compress(latency budget, widths)"
NARROW = "mse"  # the clipping of the widths below 8 (what makes 2-4 bits usable); 8 bits keep int8's min / max
ON_INT8_CONV = (2, 3, 4, 6, 8)  # per channel, on the int8 operator the latency plan timed
ON_INT8_LINEAR = (6, 8)  # at 4 bits or fewer a Linear goes to MatMulNBits instead of QGemm
NBITS_MAX_PER_CHANNEL = 4  # a float-left Linear's per-channel codes reach MatMulNBits only up to this width


@dataclass
class Widths:
    """One candidate per quantizable layer of the compacted model (float ones included) and its predicted loss."""

    plan: dict[str, Candidate]
    loss: float

    def labels(self) -> dict[str, str]:
        """The layers stored at fewer than 8 bits or weight-only, by their candidate's label."""
        return {n: c.label() for n, c in self.plan.items() if c.bits not in (8, FLOAT_BITS) or
                c.granularity == "per_group"}


def served(candidate: Candidate, module: nn.Module, int8: bool) -> bool:
    """Whether ``candidate`` is served on the operator the latency plan timed for its layer (module docstring)."""
    if int8:
        widths = ON_INT8_LINEAR if isinstance(module, nn.Linear) else ON_INT8_CONV
        return candidate.granularity == "per_channel" and candidate.bits in widths
    if candidate.bits == FLOAT_BITS:
        return True
    return isinstance(module, nn.Linear) and (candidate.granularity == "per_group" or
                                             candidate.bits <= NBITS_MAX_PER_CHANNEL)


def calibration_of(candidate: Candidate) -> str:
    return INT8.calibration if candidate.bits == 8 and candidate.granularity == "per_channel" else NARROW


def plan_widths(model: nn.Module, int8: Collection[str], size_cap: float, batches: Sequence[Any],
                forward: Callable[[nn.Module, Any], Any], loss_fn: Callable[[Any, Any], Tensor] | None
                ) -> Widths | None:
    """The widths of ``model`` (compacted, float, its ``int8`` layers to be integer) with the smallest predicted
    loss whose file is predicted within ``size_cap`` bytes; None when no served choice fits."""
    layers, _ = select_layers(model, QUANT_MODULE_TYPES)
    keys = {name: weight_key(name, module) for name, module in layers.items()}
    weights = {name: layer_weight(name, module) for name, module in layers.items()}
    fisher = diagonal_fisher(model, weights, batches, forward, loss_fn)
    counts = aliases(model, keys)
    candidates = {name: _options(name, module, weights[name], fisher[name], counts[name], name in int8)
                  for name, module in layers.items()}
    problem = Problem(candidates, fixed_bytes(model, keys), 0, int(size_cap), None)
    cheapest = {name: min(options, key=lambda c: (c.nbytes, c.score)) for name, options in candidates.items()}
    probe = copy.deepcopy(model)
    apply_widths(probe, Widths(cheapest, 0.0))
    header = file_bytes(probe) - problem.data_bytes(cheapest)
    plan = problem.choose(header)
    return None if plan is None else Widths(plan, sum(c.score for c in plan.values()))


def _options(name: str, module: nn.Module, weight: Tensor, fisher: Tensor, aliases: int, int8: bool
             ) -> list[Candidate]:
    """The candidates of one layer that are served as its latency row was timed (:func:`served`), unpruned."""
    if int8:
        runs = [(INT8.calibration, (8,)), (NARROW, tuple(w for w in ON_INT8_CONV if w != 8))]
    else:
        runs = [(NARROW, WIDTHS if isinstance(module, nn.Linear) else (FLOAT_BITS,))]
    return [c for calibration, widths in runs
            for c in layer_candidates(name, module, weight, fisher, 0.0, aliases, calibration, widths, (0.0,))
            if served(c, module, int8)]


def apply_widths(model: nn.Module, widths: Widths) -> None:
    """Each layer of ``model`` quantized as ``widths`` says (float candidates left as they are), carried on it."""
    layers: Mapping[str, nn.Module] = dict(model.named_modules())
    codes = {}
    for name, candidate in widths.plan.items():
        spec = candidate.spec(calibration_of(candidate))
        if spec is None:
            continue
        module = layers[name]
        weight = layer_weight(name, module)
        codes[weight_key(name, module)] = record_layer(name, module, quantize_tensor(weight.detach(), spec),
                                                       "rtn").qtensor
    if codes:
        attach(model, codes, SOURCE)
