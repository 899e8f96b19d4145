"""``PostTrainingQuantization``: quantize the trained model's weights at the end of ``fit``, optionally within a
metric budget, and export it. The math lives in :mod:`lightning_compress.quantization`; this only coordinates.

At ``on_train_end``:

1. every other callback with a ``finalize_compression(trainer, pl_module)`` method (e.g. the pruning callback)
   is finalized first, whatever order the callbacks were listed in, so the weights quantized are the final
   (pruned) ones; pruned zeros stay exactly zero through quantization;
2. the way back: a CPU copy of the float weights of the selected layers is kept on the callback
   (``float_weights``; :meth:`restore_float` puts them back) and, when ``export_path`` is set and
   ``save_float_copy`` is true, the whole float ``state_dict`` is written beside the export as
   ``<name>.fp32.safetensors`` before anything is quantized. (Checkpoints ModelCheckpoint wrote during ``fit``
   also hold float weights: this callback runs after them.);
3. metric before (on the trainer's validation data), quantize, metric after;
4. with ``max_metric_drop``: if the drop is over the bound, each layer's sensitivity is *measured* (metric drop
   with only that layer quantized; ties broken by lower SQNR), then the most sensitive layers go back to float
   (``fallback="float"``) or up to 8 bits then float (``"more_bits"``), one at a time, until the bound holds;
5. report (``report.layers``, ``report.fallbacks``, ``report.events``), logger metrics, export (rank zero, then
   a barrier). Under DDP every rank runs the same deterministic math on identical weights and gets the same
   synced metric, so every rank takes the same decisions.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress._strategy import check_strategy, destroy_gloo_group_at_exit
from lightning_compress import evaluation, report
from lightning_compress._validation import check_choice, check_number
from lightning_compress.quantization.export import save_float, save_quantized
from lightning_compress.quantization.functional import (
    DEFAULT_MODULE_TYPES,
    LayerQuantization,
    QuantizationResult,
    check_bits_overrides,
    check_group_size,
    quantize_layer,
    resolve_bits,
    select_layers,
    weight_name,
)
from lightning_compress.quantization.math import QuantSpec
from lightning_compress.selection import compile_patterns, resolve_module_type

FALLBACKS = ("float", "more_bits")
_NAME = "quantization"
FLOAT = 32  # "bits" of a layer kept in float


class PostTrainingQuantization(Callback):
    """Quantize the selected weights to ``bits``-bit integers when ``fit`` ends (see the module docstring).

    Args:
        bits, granularity, group_size, symmetric, calibration, percentile, mse_grid, scale_dtype: the scheme, as
            in :func:`lightning_compress.quantize` (``bits_overrides``: module-name regex -> bits, first match).
        module_types, include, exclude: which modules (default Linear, Conv1d/2d/3d); biases stay float.
        metric, metric_kwargs: torchmetrics class path (and kwargs) evaluated on the validation data.
        max_metric_drop: allowed drop in metric units (e.g. 0.01 = one accuracy point); None = no bound.
        fallback: over the bound, the most sensitive layers go back to ``"float"``, or ``"more_bits"`` (int8,
            then float).
        export_path: ``*.safetensors`` file for the quantized model (rank zero); ``save_float_copy`` also writes
            ``*.fp32.safetensors`` beside it before quantizing.
    """

    def __init__(
        self,
        bits: int = 8,
        granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel",
        group_size: int = 128,
        symmetric: bool = True,
        calibration: Literal["minmax", "percentile", "mse"] = "minmax",
        percentile: float = 99.9,
        mse_grid: int = 80,
        scale_dtype: Literal["float32", "float16"] = "float32",
        module_types: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        bits_overrides: dict[str, int] | None = None,
        metric: str = evaluation.DEFAULT_METRIC,
        metric_kwargs: dict[str, Any] | None = None,
        max_metric_drop: float | None = None,
        fallback: Literal["float", "more_bits"] = "float",
        export_path: str | None = None,
        save_float_copy: bool = True,
    ) -> None:
        super().__init__()
        self.spec = QuantSpec(bits, granularity, group_size, symmetric, calibration, percentile, mse_grid, scale_dtype)
        self.module_types = list(DEFAULT_MODULE_TYPES if module_types is None else module_types)
        if not self.module_types or not all(isinstance(t, str) for t in self.module_types):
            raise ValueError(f"`module_types` must be a non-empty list of type names, got {module_types!r}")
        for type_name in self.module_types:
            resolve_module_type(type_name)
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        check_bits_overrides(bits_overrides)
        self.metric_spec = evaluation.MetricSpec(metric, metric_kwargs)
        if max_metric_drop is not None:
            check_number("max_metric_drop", max_metric_drop, low=0)
        check_choice("fallback", fallback, FALLBACKS)
        if export_path is not None and (not isinstance(export_path, str) or not export_path.endswith(".safetensors")):
            raise ValueError(f"`export_path` must be None or a path ending in '.safetensors', got {export_path!r}")
        if not isinstance(save_float_copy, bool):
            raise TypeError(f"`save_float_copy` must be True or False, got {save_float_copy!r}")
        self.include, self.exclude = include, exclude
        self.bits_overrides = dict(bits_overrides or {})
        self.max_metric_drop = max_metric_drop
        self.fallback = fallback
        self.export_path = export_path
        self.save_float_copy = save_float_copy
        self.float_weights: dict[str, Tensor] = {}  # module name -> float weight before quantizing (CPU)
        self.result: QuantizationResult | None = None
        self.bits_used: dict[str, int] = {}  # module name -> final bits (32 = kept float)
        self.sensitivity: dict[str, float] = {}  # module name -> metric drop quantized alone (when measured)

    @property
    def float_copy_path(self) -> str | None:
        if self.export_path is None or not self.save_float_copy:
            return None
        return self.export_path.removesuffix(".safetensors") + ".fp32.safetensors"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "PostTrainingQuantization")
        destroy_gloo_group_at_exit()
        report.register(trainer, _NAME)
        layers, _ = select_layers(pl_module, self.module_types, self.include, self.exclude)
        if not layers:
            raise ValueError(
                f"nothing to quantize in {type(pl_module).__name__}: no module matches `module_types`="
                f"{self.module_types!r}, `include`={self.include!r}, `exclude`={self.exclude!r}"
            )
        check_group_size(layers, self.spec)
        if self.max_metric_drop is not None and not evaluation.has_validation_data(trainer, pl_module):
            raise ValueError(
                f"`max_metric_drop`={self.max_metric_drop} needs validation data to measure the metric on; allowed: "
                "None (no bound), or give the fit a val_dataloader, a `validation_step` and limit_val_batches > 0"
            )
        if self.export_path is not None:
            parent = Path(self.export_path).resolve().parent
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise ValueError(
                    f"`export_path`={self.export_path!r}: its directory {str(parent)!r} does not exist or is not "
                    "writable; allowed: a path in an existing, writable directory, or None"
                )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_quantization(trainer, pl_module)

    def restore_float(self, pl_module: nn.Module) -> None:
        """Put the float weights saved before quantizing back into ``pl_module``."""
        modules = dict(pl_module.named_modules())
        with torch.no_grad():
            for name, weight in self.float_weights.items():
                target = getattr(modules[name], weight_name(modules[name]))
                target.copy_(weight.to(target.device))

    # -- the work ----------------------------------------------------------------------------------------------
    def _run_quantization(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.callbacks:
            finalize = getattr(callback, "finalize_compression", None)
            if callback is not self and callable(finalize):
                finalize(trainer, pl_module)
        layers, skipped = select_layers(pl_module, self.module_types, self.include, self.exclude)
        self.float_weights = {n: getattr(m, weight_name(m)).detach().to("cpu", copy=True) for n, m in layers.items()}
        if self.float_copy_path is not None and trainer.is_global_zero:
            save_float(pl_module, self.float_copy_path)
        has_val = evaluation.has_validation_data(trainer, pl_module)
        rec = report.report_for(trainer)
        rec.metric_name, rec.higher_is_better = self.metric_spec.name, self.metric_spec.higher_is_better
        before = evaluation.evaluate(trainer, pl_module, self.metric_spec) if has_val else None
        plan = {name: resolve_bits(name, self.spec.bits, self.bits_overrides) for name in layers}
        cache: dict[tuple[str, int], LayerQuantization] = {}
        self._apply(layers, plan, cache)
        after = evaluation.evaluate(trainer, pl_module, self.metric_spec) if has_val else None
        fallbacks: list[dict[str, Any]] = []
        if self._too_far(before, after):
            rec.events.append(self._event(trainer, before, after, plan, accepted=False, note="all layers quantized"))
            after = self._fall_back(trainer, pl_module, layers, plan, cache, before, fallbacks)
        self.bits_used = dict(plan)
        self.result = QuantizationResult({n: cache[(n, b)] for n, b in plan.items() if b != FLOAT}, skipped)
        self._record(trainer, rec, layers, before, after, fallbacks)
        if self.export_path is not None and trainer.is_global_zero:
            save_quantized(pl_module, self.result, self.export_path)
            rec.files["quantized"] = self.export_path
        if self.float_copy_path is not None:
            rec.files["float_copy"] = self.float_copy_path
        trainer.strategy.barrier("lightning_compress.quantization.export")
        report.finish_if_last(trainer, pl_module, _NAME)

    def _apply(
        self,
        layers: dict[str, nn.Module],
        plan: dict[str, int],
        cache: dict[tuple[str, int], LayerQuantization],
    ) -> None:
        """Put every layer in the state ``plan`` says: float weights, or quantized at that many bits."""
        with torch.no_grad():
            for name, module in layers.items():
                weight = getattr(module, weight_name(module))
                weight.copy_(self.float_weights[name].to(weight.device))
                bits = plan[name]
                if bits == FLOAT:
                    continue
                if (name, bits) not in cache:
                    cache[(name, bits)] = quantize_layer(name, module, replace(self.spec, bits=bits))
                else:
                    weight.copy_(cache[(name, bits)].qtensor.dequantize().to(weight.device))

    def _too_far(self, before: float | None, after: float | None) -> bool:
        if self.max_metric_drop is None or before is None or after is None:
            return False
        return evaluation.metric_drop(before, after, self.metric_spec.higher_is_better) > self.max_metric_drop

    def _fall_back(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layers: dict[str, nn.Module],
        plan: dict[str, int],
        cache: dict[tuple[str, int], LayerQuantization],
        before: float,
        fallbacks: list[dict[str, Any]],
    ) -> float:
        """Measure each layer alone, then promote the most sensitive layers until the bound holds."""
        higher = self.metric_spec.higher_is_better
        sensitivity: dict[str, float] = {}
        for name in layers:
            self._apply(layers, {n: plan[name] if n == name else FLOAT for n in layers}, cache)
            alone = evaluation.evaluate(trainer, pl_module, self.metric_spec)
            sensitivity[name] = evaluation.metric_drop(before, alone, higher)
        self.sensitivity = sensitivity
        order = sorted(layers, key=lambda n: (-sensitivity[n], cache[(n, plan[n])].sqnr_db, n))
        rungs = [8, FLOAT] if self.fallback == "more_bits" else [FLOAT]
        after = before
        for rung in rungs:
            for name in order:
                if plan[name] >= rung:
                    continue
                old = plan[name]
                plan[name] = rung
                self._apply(layers, plan, cache)
                after = evaluation.evaluate(trainer, pl_module, self.metric_spec)
                drop = evaluation.metric_drop(before, after, higher)
                fallbacks.append(
                    {
                        "layer": name,
                        "from_bits": old,
                        "to_bits": rung,
                        "kept": "float" if rung == FLOAT else f"int{rung}",
                        "sensitivity": sensitivity[name],
                        "sqnr_db": cache[(name, old)].sqnr_db,
                        "metric_after": after,
                        "reason": f"most sensitive remaining layer (metric drop {sensitivity[name]:.4g} when quantized "
                        f"alone); total drop was over max_metric_drop={self.max_metric_drop}",
                    }
                )
                rank_zero_info(
                    f"PostTrainingQuantization: {name} int{old} -> {fallbacks[-1]['kept']}, metric {after:.4f}"
                )
                if drop <= self.max_metric_drop:
                    return after
        rank_zero_warn("PostTrainingQuantization: every layer fell back and the bound still does not hold")
        return after

    def _event(
        self,
        trainer: pl.Trainer,
        before: float | None,
        after: float | None,
        plan: dict[str, int],
        accepted: bool,
        note: str,
    ) -> report.CompressionEvent:
        counts = Counter("float" if b == FLOAT else f"int{b}" for b in plan.values())
        mix = ", ".join(f"{n}x {label}" for label, n in sorted(counts.items()))
        text = f"{self.spec.granularity}, {self.spec.calibration}; {note}: {mix}"
        return report.CompressionEvent("quantize", trainer.global_step, before, after, accepted=accepted, note=text)

    def _record(
        self,
        trainer: pl.Trainer,
        rec: report.CompressionReport,
        layers: dict[str, nn.Module],
        before: float | None,
        after: float | None,
        fallbacks: list[dict[str, Any]],
    ) -> None:
        for name, module in layers.items():
            weight = getattr(module, weight_name(module))
            bias = getattr(module, "bias", None)
            bias_bytes = 4 * bias.numel() if isinstance(bias, Tensor) else 0
            fp32 = 4 * weight.numel() + bias_bytes
            bits = self.bits_used[name]
            layer = self.result.layers.get(name) if self.result else None
            note = "kept float (fallback)" if layer is None else f"int{bits} SQNR {layer.sqnr_db:.1f} dB"
            if name in self.sensitivity:
                note += f"; drop alone {self.sensitivity[name]:.4g}"
            record = rec.layers.setdefault(name, report.LayerRecord(parameters=weight.numel(), bytes_fp32=fp32))
            record.sparsity = float((weight == 0).sum().item()) / max(1, weight.numel())  # pruned zeros included
            record.bits = bits
            record.bytes_compressed = fp32 if layer is None else layer.nbytes() + bias_bytes
            record.note = f"{record.note}; {note}" if record.note else note  # keeps what pruning wrote
        rec.fallbacks.extend(fallbacks)
        rec.events.append(self._event(trainer, before, after, self.bits_used, accepted=True, note="final"))
        if rec.metric_before is None:
            rec.metric_before = before
        rec.metric_after = after  # quantization runs after pruning is finalized: this is the final metric
        if before is not None and after is not None:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"quantization/metric_before": before, "quantization/metric_after": after}, step=trainer.global_step
                )
            rank_zero_info(f"PostTrainingQuantization: {self.metric_spec.name} {before:.4f} -> {after:.4f}")
