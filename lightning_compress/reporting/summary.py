"""The report's summary: every figure it shows, computed from the records as plain JSON-able values. No Lightning.

Byte accounting (what ``bytes_fp32`` / ``bytes_compressed`` mean):

- The totals cover the **whole model state** (every parameter and buffer of ``state_dict``, e.g. BatchNorm
  statistics), not only the compressed layers, so the ratio is the one of the model file. Floating-point
  entries are counted at 4 bytes per element; an entry no callback compressed costs the same before and after.
- "Before" is the model as it was when the first compression callback registered (in ``setup``), i.e. before
  pruning or compaction changed any shape.
- A compressed layer costs what the project's exports actually store: quantized layers the packed integer codes,
  scales and zero points plus the float bias (the quantized safetensors format); layers kept in float their fp32
  size. **Pruned weights of a float layer are stored dense** (the zeros take space), so sparsity alone saves no
  byte there; a quantized layer's export stores only its kept codes and where they are (a bitmap or gaps,
  :mod:`~lightning_compress.quantization.sparse_layout`) where that is smaller, and its bytes are those. Structured
  compaction (a physically smaller layer) or quantization realize the savings, and only those are counted.
"""
from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_compress.core.accounting import FLOAT_BITS, FLOAT_BYTES, state_bytes
from lightning_compress.core.gate import metric_drop
from lightning_compress.reporting.records import SCHEMA_VERSION, CompressionReport

NOTE_WHOLE_MODEL = (
    "Totals cover the whole model state (all parameters and buffers, e.g. BatchNorm statistics), floats counted at "
    "4 bytes; entries no callback compressed cost the same before and after."
)
NOTE_DENSE = (
    "Pruned weights of layers kept in float are stored dense (their zeros take space): sparsity alone is not counted "
    "as savings there; structured compaction or quantization realize the savings (a quantized layer's export stores "
    "only its kept codes where that is smaller)."
)
NOTE_FILE_SIZE = (
    "The compressed size is the size of the export file on disk (safetensors header included); the per-layer "
    "bytes are estimates of what each layer takes in it."
)
NOTE_NO_EXPORT = (
    "Quantized sizes are those of the quantized safetensors export (packed codes + scales + float bias); this run "
    "wrote no export file (set `export_path` of PostTrainingQuantization to write one)."
)



def _owner(key: str) -> str:
    """``"net.1.weight"`` -> ``"net.1"``: the module a state_dict entry belongs to."""
    return key.rpartition(".")[0]


def _by_owner(sizes: Mapping[str, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, size in sizes.items():
        out.setdefault(_owner(key), {})[key] = size
    return out


def _finite(value: Any) -> Any:
    """NaN / inf -> None (JSON has no such numbers); everything else unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _drop(before: float | None, after: float | None, higher_is_better: bool) -> float | None:
    return None if before is None or after is None else metric_drop(before, after, higher_is_better)


def summarize(report: CompressionReport, model: nn.Module | None = None) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-able values.

    ``model`` is the model after compression (its current state_dict gives the size of entries no layer record
    covers, and of layers that structured compaction made smaller); without it the records alone are used.
    """
    before_state = dict(report.model_state_bytes)
    current_state = state_bytes(model) if model is not None else {}
    before_by_owner, current_by_owner = _by_owner(before_state), _by_owner(current_state)
    layer_names = set(report.layers)

    layers: dict[str, dict[str, Any]] = {}
    any_dense_pruned = False
    for name, record in report.layers.items():
        bytes_fp32 = sum(before_by_owner.get(name, {}).values()) or record.bytes_fp32
        current = current_by_owner.get(name, {})
        notes = [record.note] if record.note else []
        if record.bits < FLOAT_BITS:
            # quantized: its weight as the quantized export stores it (codes + scales + zero points; the record's
            # bytes_compressed minus its float bias), plus the layer's other entries (bias, ...) as the model holds them
            weight_key = next((k for k in (f"{name}.weight", f"{name}.in_proj_weight") if k in current), None)
            # the bias the quantizer counted: as the model holds it now (compaction may have shrunk it since the
            # record was made; the dense bias subtracted from a compacted layer's bytes went negative)
            record_bias = (current.get(f"{name}.bias", 0) if weight_key
                           else max(0, record.bytes_fp32 - FLOAT_BYTES * record.parameters))
            others = sum(b for k, b in current.items() if k != weight_key) if weight_key else record_bias
            bytes_compressed = (record.bytes_compressed or record.bytes_fp32) - record_bias + others
        else:  # float: what the model holds now, whatever the record says (no sparse format is exported)
            bytes_compressed = sum(current.values()) or record.bytes_fp32
            if bytes_compressed < bytes_fp32:
                notes.append("compacted")  # compaction removed rows / columns: the model itself is smaller
        if record.sparsity > 0 and "compacted" not in notes and record.bits >= FLOAT_BITS:
            any_dense_pruned = True  # a quantized layer's export may store it sparse: its bytes say what it takes
            notes.append("pruned, stored dense")
        layers[name] = {
            "parameters": record.parameters,
            "sparsity": record.sparsity,
            "bits": record.bits,
            "bytes_fp32": bytes_fp32,
            "bytes_compressed": bytes_compressed,
            "ratio": bytes_fp32 / bytes_compressed if bytes_compressed else None,
            "zeros_after_rounding": record.zeros_after_rounding,
            "note": "; ".join(notes),
        }

    other_before_map = {k: b for k, b in (before_state or current_state).items() if _owner(k) not in layer_names}
    other_after_map = {k: b for k, b in (current_state or before_state).items() if _owner(k) not in layer_names}
    other_before, other_after = sum(other_before_map.values()), sum(other_after_map.values())
    layers_fp32 = sum(v["bytes_fp32"] for v in layers.values())
    layers_compressed = sum(v["bytes_compressed"] for v in layers.values())
    bytes_fp32 = layers_fp32 + other_before
    bytes_compressed = layers_compressed + other_after
    weights = sum(v["parameters"] for v in layers.values())
    sparsity = sum(v["sparsity"] * v["parameters"] for v in layers.values()) / weights if weights else 0.0
    rounded = sum((v["zeros_after_rounding"] or 0.0) * v["parameters"] for v in layers.values())
    rounds = bool(weights) and any(v["bits"] < FLOAT_BITS for v in layers.values())  # any layer rounded at all
    zeros_after_rounding = rounded / weights if rounds else None

    events = [
        {
            "kind": event.kind,
            "step": event.step,
            "metric_before": _finite(event.metric_before),
            "metric_after": _finite(event.metric_after),
            # without an explicit reference, a step is compared with the metric just before it (the gate's default)
            "reference": _finite(event.reference if event.reference is not None else event.metric_before),
            "metric_drop": _finite(event.drop if event.drop is not None else _drop(
                event.metric_before, event.metric_after, report.higher_is_better)),
            "sparsity": _finite(event.sparsity),
            "unit_sparsity": _finite(event.unit_sparsity),
            "metric_after_estimate": event.metric_after_estimate,
            "accepted": event.accepted,
            "note": event.note,
        }
        for event in report.events
    ]

    quantized = any(v["bits"] < FLOAT_BITS for v in layers.values())
    notes = [NOTE_WHOLE_MODEL]
    if any_dense_pruned and any(e["kind"] == "prune" for e in events):
        notes.append(NOTE_DENSE)
    if quantized and "quantized" not in report.files:
        notes.append(NOTE_NO_EXPORT)
    exported = _file_size(report.files.get("quantized"))
    if exported is not None:
        notes.append(NOTE_FILE_SIZE)

    bytes_delivered = exported if exported is not None else bytes_compressed
    return {
        "schema_version": SCHEMA_VERSION,
        "metric_name": report.metric_name,
        "metric_description": report.metric_description,
        "higher_is_better": report.higher_is_better,
        "metric_before": _finite(report.metric_before),
        "metric_after": _finite(report.metric_after),
        "metric_drop": _finite(_drop(report.metric_before, report.metric_after, report.higher_is_better)),
        "delivered": {"val": _finite(report.delivered_metric), "test": _finite(report.delivered_test_metric)},
        "failure": report.failure,
        "pruning": _pruning_summary(events),
        "quantization": _quantization_summary(report, events),
        "sparsity": sparsity,
        "zeros_after_rounding": zeros_after_rounding,
        "bytes_fp32": bytes_fp32,
        "bytes_compressed": bytes_delivered,
        "bytes_source": "file" if exported is not None else "estimate",
        "bytes_compressed_estimate": bytes_compressed,
        "compression_ratio": bytes_fp32 / bytes_delivered if bytes_delivered else None,
        "layers_bytes_fp32": layers_fp32,
        "layers_bytes_compressed": layers_compressed,
        "other_state": {"entries": len(other_after_map), "bytes_fp32": other_before, "bytes_compressed": other_after},
        "macs": {"before": report.macs_before, "after": report.macs_after},
        "layers": layers,
        "events": events,
        "fallbacks": [{k: _finite(v) for k, v in f.items()} for f in report.fallbacks],
        "files": {key: {"path": path, "bytes": _file_size(path)} for key, path in report.files.items()},
        "settings": report.settings,
        "gate": report.gate,
        "versions": _versions(),
        "notes": notes,
    }


def _pruning_summary(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    prune = [e for e in events if e["kind"] == "prune"]
    if not prune:
        return None
    accepted = [e for e in prune if e["accepted"]]
    drops = [e["metric_drop"] for e in accepted if e["metric_drop"] is not None]
    return {
        "events": len(prune),
        "rolled_back": len(prune) - len(accepted),
        "largest_accepted_drop": max(drops) if drops else None,
        "metric_before_first_event": prune[0]["metric_before"],  # a model still training: not an uncompressed reference
        "sparsity": accepted[-1]["sparsity"] if accepted else 0.0,
        "unit_sparsity": accepted[-1]["unit_sparsity"] if accepted else None,
    }


def _quantization_summary(report: CompressionReport, events: list[dict[str, Any]]) -> dict[str, Any] | None:
    final = [e for e in events if e["kind"] == "quantize" and e["accepted"]]
    if not final:
        return None
    return {
        "metric_float": final[-1]["metric_before"],  # the float model at the end of training, same weights otherwise
        "metric_quantized": final[-1]["metric_after"],
        "metric_drop": final[-1]["metric_drop"],
        "fallbacks": len(report.fallbacks),
    }


def _file_size(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _versions() -> dict[str, str]:
    out = {}
    for name in ("lightning_compress", "torch", "lightning", "torchmetrics"):
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except (ImportError, AttributeError):
            out[name] = "unknown"
    return out
