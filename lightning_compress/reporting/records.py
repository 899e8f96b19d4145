"""The compression report's records: plain data that the callbacks fill during one fit. No Lightning import.

What each figure means (the summary and every rendering keep these meanings):

- ``CompressionEvent``: one compression step (a pruning event, the quantization). ``metric_before`` is measured
  immediately before the step, ``metric_after`` immediately after it; ``reference`` is the figure the metric gate
  judged ``metric_after`` against (``metric_before`` by default, the metric before the first pruning event with
  ``metric_reference="initial"``) and ``drop`` = how much worse ``metric_after`` is than ``reference``. When the gate
  stopped early (part of the validation set seen), ``metric_after`` and ``drop`` are None and
  ``metric_after_estimate`` holds the estimate: ``value``, its interval ``low`` / ``high``, and ``samples`` seen of
  ``population``; it is never shown or plotted as a measured metric.
- ``sparsity``: the fraction of the tracked weights that *pruning* has removed (each parameter counted once);
  ``unit_sparsity`` the same over units (structured). Zeros that rounding produced are never counted as sparsity.
- ``delivered_metric`` / ``delivered_test_metric``: one evaluation of the model that the fit delivers, after the
  last compression action (pruning finalised, compaction, quantization), on the validation / test data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 2


@dataclass
class CompressionEvent:
    """One compression step: a pruning step or the quantization, with the metric before and after it."""

    kind: str  # "prune" | "quantize"
    step: int  # trainer.global_step when it happened
    metric_before: float | None  # measured immediately before the step
    metric_after: float | None  # measured immediately after it
    sparsity: float | None = None  # pruning: fraction of the tracked weights pruned after the step
    accepted: bool = True  # False: rolled back (pruning) / over the bound before fallbacks (quantization)
    note: str = ""
    reference: float | None = None  # what the gate compared metric_after with
    drop: float | None = None  # metric_after worse than reference, in the metric's units (negative: better)
    unit_sparsity: float | None = None  # structured pruning: fraction of the prunable units removed
    metric_after_estimate: dict[str, float] | None = None  # early stop: the estimate instead of metric_after

    def estimated(self, estimate: dict[str, float]) -> None:
        """Mark the metric after the step as estimated on part of the set (see the module), and say so in the
        note."""
        self.metric_after_estimate, self.metric_after, self.drop = dict(estimate), None, None
        said = (f"metric after estimated on {estimate['samples']} of {estimate['population']} samples: "
                f"{estimate['value']:.4f} [{estimate['low']:.4f}, {estimate['high']:.4f}]")
        self.note = "; ".join(text for text in (self.note, said) if text)

    @classmethod
    def from_pruning(cls, entry: dict[str, Any], structured: bool) -> CompressionEvent:
        """The event of one entry of :attr:`PruningController.history`."""
        note = "; ".join(text for text in (entry["reason"], entry["note"]) if text)
        units = entry["sparsity"] if structured else None
        return cls("prune", entry["step"], entry["metric_before"], entry["metric_after"], entry["weight_sparsity"],
                   entry["accepted"], note, entry["reference"], entry["drop"], units)


@dataclass
class LayerRecord:
    parameters: int  # weight elements of this layer (bias excluded)
    sparsity: float = 0.0  # fraction of the weight elements removed by pruning
    bits: int = 32  # storage bits per weight element (32 = float)
    bytes_fp32: int = 0  # weight + bias bytes in fp32
    bytes_compressed: int = 0  # bytes in the exported artifact (ints + scales/zero points + float bias)
    note: str = ""
    zeros_after_rounding: float | None = None  # quantization: fraction of codes that are zero beyond the pruned ones


@dataclass
class CompressionReport:
    metric_name: str = ""
    higher_is_better: bool = True
    metric_description: str = ""  # e.g. "MulticlassAccuracy(average='macro')": how the metric averages
    metric_before: float | None = None  # quantization: the float model at the end of training; else None
    metric_after: float | None = None  # the delivered model (final evaluation), validation data
    delivered_metric: float | None = None  # = metric_after
    delivered_test_metric: float | None = None  # the delivered model on the test data, when the datamodule has it
    events: list[CompressionEvent] = field(default_factory=list)
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # quantization layers kept at more bits / float
    files: dict[str, str] = field(default_factory=dict)  # artifacts written, absolute paths (export, float copy, ...)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # callback name -> its constructor arguments
    gate: dict[str, Any] = field(default_factory=dict)  # callback name -> {"max_metric_drop", "reference"}
    macs_before: int | None = None  # structured pruning: multiply-accumulates per example before / after
    macs_after: int | None = None
    # every entry of the model's state_dict when the first compression callback set up -> its bytes (floats
    # counted as fp32): the "before" of the whole-model totals, taken before pruning or compaction changed anything
    model_state_bytes: dict[str, int] = field(default_factory=dict)
    # why the fit delivered nothing (an artifact that could not be written, a model that is not finite): the error,
    # naming the file or the parameters; None when the fit delivered its model
    failure: str | None = None

    def record_layer(self, name: str, parameters: int, bytes_fp32: int) -> LayerRecord:
        """The layer's record, created (float, nothing removed) the first time a callback reports on it."""
        return self.layers.setdefault(name, LayerRecord(parameters=parameters, bytes_fp32=bytes_fp32,
                                                        bytes_compressed=bytes_fp32))
