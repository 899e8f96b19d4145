"""``quantize(model, bits=8, ...)``: post-training weight quantization of any ``nn.Module``, no Trainer needed.

Selected weights are quantized with :mod:`lightning_compress.quantization.primitives` and replaced *in place* by their
dequantized float values, so the model keeps running with ordinary float kernels (and stays trainable, loadable,
exportable). The returned :class:`QuantizationResult` holds, per layer, the integer codes and qparams (what
:func:`~lightning_compress.quantization.export.save_quantized` writes) and the SQNR in dB.

Which weight of a module is quantized: ``weight`` (Linear, Conv1d/2d/3d, Embedding, or any selected class with a
2-D+ ``weight``), and ``in_proj_weight`` for ``nn.MultiheadAttention`` (its fused q/k/v projection). By default
(:data:`QUANT_MODULE_TYPES`) all of these are selected, so a transformer is covered whole: embeddings at
``embedding_bits`` (8 unless asked otherwise: a lookup table has no input Hessian to compensate with, and its rows
feed every layer), a default-selected Embedding / MultiheadAttention whose input size ``group_size`` does not divide
is kept float (recorded) instead of failing. Biases and normalization parameters stay float; every module with
parameters that stays float is listed in ``QuantizationResult.skipped`` with the reason. A weight shared by two
selected modules (tied embeddings) is quantized once, under its first name.

Methods: ``"rtn"`` (round to nearest with the calibrated range) and ``"gptq"`` (:mod:`.gptq`: data-aware rounding
with each layer's input Hessian, from ``calibration_data``; layers GPTQ cannot see are rounded to nearest, noted in
``QuantizationResult.notes``; a calibration forward that reaches none of them, fails, or reads NaN / inf raises,
naming ``forward`` / ``calibration_data``, before any layer changes).

Non-finite weights are refused: a NaN or inf in a weight would make its row's (or the tensor's) range non-finite
and silently zero or poison the whole row, so :func:`quantize` raises naming the layers before changing anything.

Accuracy guard: with ``metric_fn`` (model -> float) and ``max_metric_drop``, the model is measured before and after;
if the drop exceeds the bound, layers fall back (most sensitive first) to more bits and then float, as the
Lightning callback does (:mod:`.fallback`, :class:`~lightning_compress.core.gate.MetricGate`). Fallback rungs are
made like the first pass (GPTQ from the kept Hessians with ``method="gptq"``; :mod:`.rungs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.core.gate import MetricGate
from lightning_compress.core.validation import check_bool, check_number
from lightning_compress.quantization.calibration import feed, take_batches, to_device
from lightning_compress.quantization.carried import attach, drop
from lightning_compress.quantization.checks import (
    bound_outcome,
    check_finite_batches,
    check_metric_fn,
    check_runs,
    check_shared,
    float_copies,
    measure,
    restore,
    warn,
)
from lightning_compress.quantization.coverage import (  # noqa: F401 - METHODS, resolve_bits, ...: re-exported
    CALIBRATION_BATCHES,
    FALLBACK,
    METHODS,
    QUANT_MODULE_TYPES,
    check_bits_overrides,
    check_finite,
    check_group_size,
    float_leftovers,
    plan_layers,
    resolve_bits,
    select_layers,
    weight_key,
    weight_name,
)
from lightning_compress.quantization.coverage import layer_weight as _weight
from lightning_compress.quantization.fallback import fall_back, rungs
from lightning_compress.quantization.gptq import GPTQConfig, gptq_model, gptq_supports
from lightning_compress.quantization.layer import LayerQuantization, quantize_layer, record_layer
from lightning_compress.quantization.primitives import QuantSpec
from lightning_compress.quantization.rungs import LayerRungs


@dataclass
class QuantizationResult:
    layers: dict[str, LayerQuantization] = field(default_factory=dict)  # by module name, in model order
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it stays float
    notes: dict[str, str] = field(default_factory=dict)  # module name -> remark (e.g. GPTQ fell back to RTN: why)
    metric_before: float | None = None  # with `metric_fn`: the float model's metric
    metric_after: float | None = None  # ... and the returned model's
    bound_met: bool | None = None  # with `max_metric_drop`: whether the returned model meets it (None: no bound)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # layers promoted to keep the metric bound

    def sqnr(self) -> dict[str, float]:
        return {name: layer.sqnr_db for name, layer in self.layers.items()}

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: layer.summary() for name, layer in self.layers.items()}


def quantize(
    model: nn.Module,
    bits: int = 8,
    granularity: str = "per_channel",
    group_size: int = 128,
    symmetric: bool = True,
    calibration: str = "minmax",
    *,
    percentile: float = 99.9,
    mse_grid: int = 80,
    scale_dtype: str = "float32",
    module_types: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    bits_overrides: Mapping[str, int] | None = None,
    embedding_bits: int | None = None,
    method: str = "rtn",
    calibration_data: Iterable[Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    calibration_batches: int | None = None,
    gptq: GPTQConfig | None = None,
    metric_fn: Callable[[nn.Module], float] | None = None,
    max_metric_drop: float | None = None,
    higher_is_better: bool = True,
    fallback: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> QuantizationResult:
    """Quantize the weights of ``model``'s selected layers to ``bits``-bit integers, in place (dequantized).

    Args:
        bits: 2..8. ``bits_overrides`` maps module-name regexes to other bit widths (first match wins, before
            ``embedding_bits``).
        granularity: ``"per_tensor"``, ``"per_channel"`` (per output channel / Embedding row) or ``"per_group"``
            (``group_size`` consecutive inputs of one output channel; must divide each selected layer's input size).
        symmetric: signed codes, zero point 0; else affine with an integer zero point.
        calibration: ``"minmax"``, ``"percentile"`` (``percentile`` of ``|w|``) or ``"mse"`` (clipping search over
            ``mse_grid`` ratios, minimizing reconstruction error per channel / group; see :mod:`.calibration`).
        scale_dtype: ``"float32"`` or ``"float16"`` (smaller files for small groups).
        module_types, include, exclude: which modules (see :func:`lightning_compress.select_modules`); default
            :data:`QUANT_MODULE_TYPES` (Linear, Conv1d/2d/3d, Embedding, MultiheadAttention).
        embedding_bits: bits for ``nn.Embedding`` tables; ``None``: 8 under the default selection (``module_types``
            not given), else ``bits`` (as before: a model whose Embedding was asked for explicitly keeps ``bits``).
        method: ``"rtn"`` or ``"gptq"`` (needs ``calibration_data``).
        calibration_data: an iterable of batches (a DataLoader, a list of tensors or of tokenizer dicts); at most
            ``calibration_batches`` are used, moved to the model's device.
        forward: how a batch is fed, ``forward(model, batch)``; default: dicts as ``model(**batch)``, tuples / lists
            as ``model(batch[0])``, anything else as ``model(batch)``.
        gptq: :class:`~.gptq.GPTQConfig` (dampening, block size, act order, sequential); default ``GPTQConfig()``.
        progress: ``progress(done, total, layer_name)``, called as GPTQ takes each layer (e.g. a tqdm bar's update).
        metric_fn: ``metric_fn(model) -> float`` measured on the float model and after quantization
            (``higher_is_better`` says its direction); with ``max_metric_drop`` the layers fall back, most sensitive
            first, along ``fallback``: ``"more_bits"`` (every even width above ``bits`` up to 8, then float; the
            default) or ``"float"``. ``metric_fn`` must return a finite number (else ValueError); a bound met only with
            every layer float, or not met, warns and sets ``QuantizationResult.bound_met``.

    Arguments that would do nothing are refused: ``calibration_data``, ``forward``, ``gptq``, ``progress``,
    ``calibration_batches`` with ``method="rtn"``; ``fallback`` without ``max_metric_drop``. Whatever raises, the
    selected layers get their float weights back. The model carries its codes afterwards
    (:mod:`.carried`), so an export needs no ``result``.

    Returns:
        the per-layer codes, qparams, SQNR and sparsity (layers in model order), what stayed float and why, notes,
        and the metric before / after and the fallbacks taken when ``metric_fn`` is given.
    """
    spec = QuantSpec(bits, granularity, group_size, symmetric, calibration, percentile, mse_grid, scale_dtype)
    check_bits_overrides(bits_overrides)
    check_bool("higher_is_better", higher_is_better)
    check_metric_fn(metric_fn)
    if max_metric_drop is not None:
        check_number("max_metric_drop", max_metric_drop, low=0.0)
        if metric_fn is None:
            raise ValueError(f"`max_metric_drop`={max_metric_drop} needs `metric_fn` (a callable model -> float)")
    if forward is not None and not callable(forward):
        raise TypeError(f"`forward` must be a callable (model, batch) -> output, got {forward!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"`progress` must be a callable (done, total, layer_name) or None, got {progress!r}")
    if gptq is not None and not isinstance(gptq, GPTQConfig):
        raise TypeError(f"`gptq` must be a GPTQConfig or None, got {gptq!r}")
    check_shared(method, calibration_batches, embedding_bits, fallback, max_metric_drop,
                 {"calibration_data": calibration_data, "forward": forward, "gptq": gptq, "progress": progress})
    if method == "gptq" and calibration_data is None:
        raise ValueError("`method`='gptq' needs `calibration_data`: an iterable of batches the model can run")
    chosen = plan_layers(model, spec, module_types, include, exclude, bits_overrides, embedding_bits)
    layers, skipped, specs = chosen.layers, chosen.skipped, chosen.specs
    check_finite(layers)
    plan = chosen.bits
    floats = float_copies(layers, _weight)  # the way back, whatever raises below
    try:
        result = _quantize(model, layers, skipped, specs, plan, floats, spec.bits, method, calibration_data,
                           forward or feed, calibration_batches or CALIBRATION_BATCHES, gptq or GPTQConfig(),
                           metric_fn, max_metric_drop, higher_is_better, fallback or FALLBACK, progress)
    except BaseException:
        restore(layers, floats, _weight)
        raise
    drop(model, [weight_key(name, layers[name]) for name in layers if plan[name] == FLOAT_BITS])
    attach(model, {layer.key: layer.qtensor for layer in result.layers.values()}, "quantize()")
    return result


def _quantize(
    model: nn.Module, layers: dict[str, nn.Module], skipped: dict[str, str], specs: dict[str, QuantSpec],
    plan: dict[str, int], floats: dict[str, Tensor], bits: int, method: str, calibration_data: Iterable[Any] | None,
    forward: Callable[[nn.Module, Any], Any], calibration_batches: int, gptq: GPTQConfig,
    metric_fn: Callable[[nn.Module], float] | None, max_metric_drop: float | None, higher_is_better: bool,
    fallback: str, progress: Callable[[int, int, str], None] | None,
) -> QuantizationResult:
    """:func:`quantize` after its checks: the first pass, the metric, the fallback (``plan`` changed in place)."""
    gate = MetricGate(max_metric_drop, higher_is_better)
    before = None if metric_fn is None else measure(metric_fn, model)
    result = QuantizationResult(skipped=skipped)
    if method == "gptq":
        data = calibration_data if calibration_data is not None else ()
        states = gptq_layers(model, layers, specs, floats, data, forward, calibration_batches, gptq, result.notes,
                             keep_hessians=max_metric_drop is not None, progress=progress)
    else:
        states = LayerRungs(layers, floats, specs)
        for name, module in layers.items():
            states.add(quantize_layer(name, module, specs[name]))
    if metric_fn is not None and before is not None:  # `before` is None exactly when there is no metric_fn
        result.metric_before = before
        result.metric_after = after = measure(metric_fn, model)
        if max_metric_drop is not None and not gate.judge(before, after).accepted:
            result.metric_after, result.fallbacks, _ = fall_back(
                list(layers), plan, states.apply, lambda: measure(metric_fn, model),
                lambda n, b: states[(n, b)].sqnr_db, gate, before, rungs(bits, fallback), size=states.weights,
            )
            drops = [gate.drop(before, m) for m in (after, *(f["metric_after"] for f in result.fallbacks))]
            result.bound_met, message = bound_outcome("quantize()", max_metric_drop, drops, plan, FLOAT_BITS)
            if message:
                warn(message)
        elif max_metric_drop is not None:
            result.bound_met = True
    for name in layers:
        if plan[name] == FLOAT_BITS:
            skipped[name] = "kept float: metric fallback (`max_metric_drop`)"
        else:
            result.layers[name] = states[(name, plan[name])]
    result.skipped.update(float_leftovers(model, layers, skipped))
    return result


def gptq_layers(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    specs: Mapping[str, QuantSpec],
    floats: Mapping[str, Tensor],
    data: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
    limit: int,
    config: GPTQConfig,
    notes: dict[str, str],
    *,
    keep_hessians: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    argument: str = "`calibration_data`",
) -> LayerRungs:
    """GPTQ where it applies (layers in forward order, from the quantized layers' outputs); round to nearest first
    for the layers without an input Hessian (embeddings), last for those the forward did not reach. The returned
    states hold these quantizations; with ``keep_hessians`` (a metric fallback may follow) also the Hessians, so that
    other widths of the GPTQ layers are GPTQ too."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = [to_device(batch, device) for batch in take_batches(data, limit)]
    check_finite_batches(batches, argument)
    training = model.training
    model.eval()
    try:
        check_runs(model, batches[0], run, argument)
    finally:
        model.train(training)
    states = LayerRungs(layers, floats, specs, gptq=config)
    for name, module in layers.items():
        if why := gptq_supports(module):
            notes[name] = f"round to nearest: {why}"
            states.add(quantize_layer(name, module, specs[name]))
    todo = {n: m for n, m in layers.items() if (n, specs[n].bits) not in states.made}
    training = model.training
    model.eval()
    try:
        qtensors, left = gptq_model(model, todo, specs, batches, run, config,
                                    states.hessians if keep_hessians else None, progress)
    finally:
        model.train(training)
    for name, module in todo.items():
        if name in qtensors:
            states.add(record_layer(name, module, qtensors[name], "gptq", floats[name]))
        else:
            notes[name] = f"round to nearest: {left[name]}"
            states.add(quantize_layer(name, module, specs[name]))
    return states
