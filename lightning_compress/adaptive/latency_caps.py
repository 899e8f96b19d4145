"""A latency budget with size / MACs caps in a fit (``AdaptiveCompression(budget=Budget(latency=0.5, size="25MB"))``),
the pure half of its end. No Lightning import.

During the fit the latency part removes whole units (:mod:`.in_fit_units`); the model is compacted at its end. What
is left is met by the verified ``compress()`` path on the compacted model, the latency still counted against the
DENSE model (the graph the fit kept when it timed the table), not the compacted one:

- the compacted model measured within the latency (and its MACs within their cap): the widths are planned for the
  size / MACs caps as a budget without latency plans them (``compress(search="bits")``, bits per layer); the
  delivered model is timed again as the graph ``export_onnx(model)`` writes for those codes (:func:`served_graph`:
  weight-only, which can be slower than the float graph); where that misses the latency, the floats go back and
  the int8 path below plans instead (its graph is the static one it timed);
- otherwise int8 where it pays: ``compress()``'s latency path on the compacted model, int8 only (no further units:
  the fit's model keeps its structure), for the latency left, ``latency / measured`` of the compacted model, under
  the same caps (:func:`next_budget`); its timings are rank zero's on every rank (:func:`shared_timings`), so every
  rank takes the same decisions; the delivered copy's weights, int8 codes and input ranges go into the fit's model
  (:func:`take`), served as the static graph that was timed (:func:`served_graph`).

Either way the delivered model is then timed against the dense graph for real (:func:`~.in_fit_units.verify`), its
file measured on disk before it is written and its MACs counted; a cap missed ends the fit with the nearest
budget the steps measured.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.adaptive import latency
from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.caps import Caps
from lightning_compress.adaptive.in_fit import from_rank_zero
from lightning_compress.adaptive.int8_latency import EXAMPLE_ROWS, calibration_inputs, onnx_graph
from lightning_compress.adaptive.session import BudgetError
from lightning_compress.quantization.carried import attach, carried
from lightning_compress.serving._trained import collect
from lightning_compress.serving.onnx import export_onnx

LEFT_MAX = 0.99  # a Budget's latency is a fraction below 1: the latency left when the units met it already


def next_budget(budget: Budget, caps: Caps, ratio: float, macs: int | None, widths: bool = True
                ) -> tuple[Budget, str]:
    """What the end of the fit plans on the compacted model, measured at ``ratio`` of the dense latency with
    ``macs`` per example (None: no MACs cap): ``"widths"`` (a size / MACs budget in absolute bytes / MACs, the
    latency met) or ``"int8"`` (the latency left relative to the compacted model, with the same caps). MACs still
    over their cap are refused here (:class:`~.session.BudgetError` naming them): int8 lowers no MAC and this end
    of the fit removes no unit. ``widths`` False: ``"int8"`` even where the latency is met (the widths' graph, as
    ``export_onnx`` writes it, measured over it)."""
    assert budget.latency is not None
    if caps.macs_cap is not None and macs is not None and macs > caps.macs_cap:
        raise BudgetError(f"`budget` macs={budget.macs!r} ({caps.macs_cap} per example): the model compacted for the "
                          f"latency counts {macs} MACs per example, and what is left after the units (int8, widths) "
                          f"lowers no MAC; the nearest budget: macs={macs} per example; allowed: at least that, or "
                          f"a smaller latency budget (more units removed)", (None, macs))
    if widths and ratio <= budget.latency:
        return Budget(size=caps.size_cap, macs=caps.macs_cap), "widths"
    left = min(LEFT_MAX, budget.latency / ratio)
    return Budget(size=caps.size_cap, macs=caps.macs_cap, latency=left, latency_input=budget.latency_input,
                  threads=budget.threads), "int8"


def shared_timings(share: Callable[[Any], Any]) -> latency.Timings:
    """Timings (:func:`~.latency.measure`'s signature) that are rank zero's on every rank (``share``: the
    broadcast; every rank calls them in the same order), or rank zero's error on every rank
    (:func:`~.in_fit.from_rank_zero`): the plan, its corrections and the delivered ratio then follow the same
    numbers everywhere. Passed as ``timings=`` to :func:`~.latency_budget.latency_result`."""

    def timings(graphs: Mapping[str, bytes], shapes: Mapping[str, Sequence[int]], threads: int,
                rounds: int = latency.ROUNDS, warmup: int = latency.WARMUP) -> dict[str, float]:
        return from_rank_zero(share, lambda: latency.measure(graphs, shapes, threads, rounds=rounds, warmup=warmup),
                              "an ONNX Runtime timing")

    return timings


@torch.no_grad()
def take(model: nn.Module, delivered: nn.Module) -> None:
    """The delivered copy (same structure as ``model``) into ``model``: its weights, the int8 codes it carries and
    each int8 layer's input range."""
    model.load_state_dict(delivered.state_dict())
    record = carried(delivered)
    if record is not None and record.codes:
        attach(model, dict(record.codes), record.source).activations.update(record.activations)


def served_graph(model: nn.Module, shape: Sequence[int], batches: Sequence[Any]) -> bytes:
    """The graph ``export_onnx(model, path, example)`` writes for ``model`` by default, the call a user serves it
    with: the static int8 graph where it carries input ranges; else, where it carries codes (a widths plan), the
    weight-only graph (``activations="dynamic"``: ``ConvInteger`` / ``MatMulNBits``, which can run slower than the
    float one, so it is the one timed); else the float graph."""
    if collect(model):
        return onnx_graph(model, calibration_inputs(batches))[0]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "served.onnx"
        export_onnx(model, path, torch.randn(EXAMPLE_ROWS, *shape[1:], generator=torch.Generator().manual_seed(0)))
        return path.read_bytes()
