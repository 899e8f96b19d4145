"""A hand-made ``CompressionReport`` and a tiny model with BatchNorm, so every number is checked by hand."""

from __future__ import annotations

from torch import nn

from lightning_compress.core.accounting import state_bytes
from lightning_compress.reporting.records import CompressionEvent, CompressionReport, LayerRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model() -> nn.Sequential:
    # conv 16*1*3*3 + 16 bias, BN(16) weight/bias/running_mean/running_var + num_batches_tracked, Linear 16 -> 4
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16, 4))


CONV_FP32 = 4 * (144 + 16)  # 640
BN_FP32 = 4 * 16 * 4 + 8  # four float vectors + the int64 counter
LINEAR_FP32 = 4 * (64 + 4)  # 272


def _report(model: nn.Module | None = None) -> CompressionReport:
    report = CompressionReport(metric_name="MulticlassAccuracy", metric_before=0.95, metric_after=0.94,
                               delivered_metric=0.94)
    # conv: pruned to 50 %, kept float (stored dense); linear: int4, 32 bytes of codes + 16 of scales + 16 of bias
    report.layers["0"] = LayerRecord(parameters=144, sparsity=0.5, bits=32, bytes_fp32=CONV_FP32,
                                     bytes_compressed=CONV_FP32)
    report.layers["3"] = LayerRecord(parameters=64, sparsity=0.25, bits=4, bytes_fp32=LINEAR_FP32, bytes_compressed=64,
                                     note="int4 SQNR 20.0 dB")
    report.events = [
        CompressionEvent("prune", 10, 0.95, 0.955, 0.25),
        CompressionEvent("prune", 20, 0.955, 0.90, 0.5, accepted=False, note="rolled back"),
        CompressionEvent("prune", 30, 0.955, 0.95, 0.45),
        CompressionEvent("quantize", 40, 0.95, 0.94, None, note="final"),
    ]
    report.fallbacks = [{"layer": "0", "from_bits": 4, "to_bits": 32, "kept": "float", "sensitivity": 0.02}]
    if model is not None:
        report.model_state_bytes = state_bytes(model)
    return report
