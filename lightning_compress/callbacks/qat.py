"""``QuantizationAwareTraining``: fake-quantize the selected weights in the last part of ``fit`` (LSQ, learnable
scales) and deliver the codes it trained. The math lives in :mod:`lightning_compress.qat`; this coordinates.

- From ``start`` on (an epoch, or a fraction of the fit), every selected weight (the coverage of
  :func:`lightning_compress.quantize`) is fake-quantized through ``torch.nn.utils.parametrize``: the model's forward
  and its signature are untouched (args, kwargs, dicts), validation sees the quantized model, so the metric logged
  is the quantized model's. Pruning masks in force are respected (a pruning schedule still running at ``start`` is
  refused before the first step). A ``GradientStabilityPruning(structured=True, compact=True)`` is finished when
  QAT starts: the model is compacted then, and QAT trains the codes of the compacted layers
  (:mod:`lightning_compress.qat.compaction`).
- Under DDP the module is wrapped again once the fake quantizers are on (:mod:`lightning_compress.integration.rewrap`):
  the scales are parameters of the wrapped module, their gradients all-reduced like the weights', so every rank
  trains the same scales and delivers the same codes.
- The scales are trained by the fit's optimizer: they are added to ``trainer.optimizers[0]`` as one more param
  group, with the first group's settings, learning rate ``scale_lr`` (default the first group's) and no weight
  decay. An LR scheduler built before drives it only if it reads every group's own keys (``OneCycleLR`` then drives
  it like the first group); those that keep a list per group (``LambdaLR``, ``CosineAnnealingLR``) leave it at
  its rate.
- Checkpoints keep the model's own keys (the latent float weights under ``<name>.weight``); the scales and their
  optimizer state travel in this callback's state, so a resumed fit continues with the same scales and moments.
- At the end of the fit the exact codes the forward used go to :class:`PostTrainingQuantization`'s delivery (the
  float-vs-quantized gate and fallback, the report, the export, ``compressed.ckpt``): nothing is re-rounded, the
  delivered model is the one that was validated. The gate's float reference is the model's metric measured just
  before QAT started (kept in checkpoints); a fallback rung (more bits, float) is made from the latent weights.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_compress.adaptive.with_qat import DECIDED_BY_BUDGET, BudgetPlan, layer_plan, refuse_decided_twice
from lightning_compress.callbacks.base import CompressionCallback, compression_callbacks
from lightning_compress.callbacks.pruning import GradientStabilityPruning
from lightning_compress.callbacks.quantization import PostTrainingQuantization
from lightning_compress.core.validation import check_choice, check_number
from lightning_compress.integration import compacted_resume
from lightning_compress.integration.evaluation import DEFAULT_METRIC
from lightning_compress.integration.rewrap import rewrap_ddp
from lightning_compress.qat import activations as act
from lightning_compress.qat import scales_group, schedule
from lightning_compress.qat.compaction import follow_parameters, masks_after
from lightning_compress.qat.fake_quant import LSQFakeQuantizer
from lightning_compress.qat.model import plain_keys, prepare, record, release
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.coverage import LayerPlan, weight_key
from lightning_compress.quantization.primitives import QuantizedTensor
from lightning_compress.quantization.rungs import LayerRungs
from lightning_compress.structure.serialization import save_compacted


class QuantizationAwareTraining(PostTrainingQuantization):
    """Quantization-aware training from ``start`` to the end of the fit (see the module docstring).

    Args:
        bits: 2..8, symmetric codes; ``granularity`` ``"per_tensor"`` / ``"per_channel"`` / ``"per_group"`` with
            ``group_size``.
        start: an epoch (int >= 0) or a fraction of the fit's optimizer steps (float in (0, 1)).
        scale_lr: learning rate of the scales' param group; None: the first param group's. The weights' scales
            are learned in log space, scaled so that a step of ``scale_lr`` moves a clipping edge by about
            ``scale_lr``, as a weight moves (:class:`~lightning_compress.qat.fake_quant.LSQFakeQuantizer`): under
            an Adam-type optimizer the weights' rate suits scales of any size.
        module_types, include, exclude, bits_overrides, embedding_bits, metric, metric_kwargs, max_metric_drop,
            fallback, export_path, save_float_copy: as :class:`PostTrainingQuantization` (fallback widths other than
            ``bits`` are rounded to nearest from the latent weights).
        activations: None (float activations) or ``"int8"``: the inputs of the quantized layers fake-quantized to
            uint8 per tensor, ranges learned with the scales (:mod:`lightning_compress.qat.activations`); the model
            carries the trained ranges, and ``export_onnx(activations="static")`` writes them (QLinearConv / QGemm)
            instead of calibrating. The metric gate judges the weights' codes (activations float at the end).

    With :class:`~lightning_compress.AdaptiveCompression` in the same Trainer, the budget decides: when QAT starts,
    that callback plans each layer's width and granularity on the masks reached, QAT trains them, and it verifies and
    delivers the codes trained; the arguments that would decide them again are refused unless left at their defaults
    (:mod:`lightning_compress.adaptive.with_qat`).

    Refused in ``setup``: a second quantization callback; in ``on_train_start`` (before the first step): a
    ``start`` the fit never reaches, a pruning schedule not over by ``start``.
    """

    def __init__(
        self,
        bits: int = 4,
        granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel",
        group_size: int = 128,
        start: int | float = 0.8,
        scale_lr: float | None = None,
        module_types: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        bits_overrides: dict[str, int] | None = None,
        embedding_bits: int | None = None,
        metric: str = DEFAULT_METRIC,
        metric_kwargs: dict[str, Any] | None = None,
        max_metric_drop: float | None = None,
        fallback: Literal["float", "more_bits"] | None = None,
        export_path: str | None = None,
        save_float_copy: bool = True,
        activations: Literal["int8"] | None = None,
    ) -> None:
        super().__init__(bits, granularity, group_size, symmetric=True, calibration="mse",
                         module_types=module_types, include=include, exclude=exclude, bits_overrides=bits_overrides,
                         metric=metric, metric_kwargs=metric_kwargs, max_metric_drop=max_metric_drop,
                         fallback=fallback, export_path=export_path, save_float_copy=save_float_copy,
                         embedding_bits=embedding_bits)
        schedule.check_start(start)
        if scale_lr is not None:
            check_number("scale_lr", scale_lr, low=0, low_inclusive=False)
        check_choice("activations", activations, (None, "int8"))
        self.start = start
        self.scale_lr = scale_lr
        self.activations = activations
        self._given = {k: v for k, v in locals().items() if k in DECIDED_BY_BUDGET}  # the budget decides them
        self._budget: Any = None  # an AdaptiveCompression in the same Trainer: it plans the widths and delivers
        self.budget_plan: BudgetPlan | None = None  # its plan, made when QAT started (kept in checkpoints)
        self.input_quantizers: dict[str, act.InputFakeQuantizer] = {}  # module name -> its input's, while QAT runs
        self._ranges: dict[str, act.Range] = {}  # weight key -> trained input range, read at the end of the fit
        self.quantizers: dict[str, LSQFakeQuantizer] = {}  # module name -> its fake quantizer, while QAT runs
        self._start_step = 0
        self._group: dict[str, Any] | None = None  # the scales' param group in trainer.optimizers[0]
        self._pending: dict[str, Any] | None = None  # a resumed checkpoint's state, applied when QAT starts
        self._codes: dict[str, QuantizedTensor] = {}  # read at the end of the fit
        self._keys: dict[str, str] = {}  # module name -> its weight's state_dict key
        self._compacted_by: GradientStabilityPruning | None = None  # the pruning that compacted when QAT started
        self._float_metric: float | None = None  # the float model's metric when QAT started: the gate's reference
        self._reference_next = False  # the next _evaluate (PTQ's "before") answers with _float_metric
        self._resume_check: Any = None  # shrinks the model to a compacted checkpoint, until the fit starts

    @property
    def active(self) -> bool:
        return bool(self.quantizers)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "method": "qat", "start": self.start, "scale_lr": self.scale_lr,
                "activations": self.activations}

    # -- setup -------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        for peer in compression_callbacks(trainer):
            if isinstance(peer, PostTrainingQuantization) and peer is not self:
                raise ValueError("QuantizationAwareTraining and another quantization callback "
                                 f"({type(peer).__name__}) in one Trainer would quantize the same weights twice; "
                                 "allowed: one of them")
        self.quantizers, self._group, self._codes, self._compacted_by = {}, None, {}, None
        self.input_quantizers, self._ranges = {}, {}
        self._budget, self.budget_plan = budget_peer(trainer), None
        if self._budget is not None:
            refuse_decided_twice(self._given, QuantizationAwareTraining.__init__)
            self.report.settings[self.report_name].update(  # not this callback's: the budget plans them
                bits="per layer, the budget's plan", granularity="per layer, the budget's plan", group_size=None)
        if any(isinstance(p, GradientStabilityPruning) and p.config.compact for p in compression_callbacks(trainer)):
            self._resume_check = compacted_resume.shrink_on_resume(pl_module, self.state_key)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The checkpoint (if any) is restored by now: the check of its shapes goes."""
        self._drop_resume_check()

    def _drop_resume_check(self) -> None:
        if self._resume_check is not None:
            self._resume_check()
            self._resume_check = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The step QAT starts at, and pruning over by then: refused here, before the first step."""
        batches = trainer.num_training_batches
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches)) if math.isfinite(batches) else 1
        total = trainer.estimated_stepping_batches
        self._start_step = schedule.start_step(self.start, per_epoch, float(total), trainer.max_epochs)
        for peer in compression_callbacks(trainer):
            if isinstance(peer, GradientStabilityPruning):
                plan = peer._schedule(trainer)
                end = schedule.pruning_end_step(plan.last_tick(), peer.config.schedule_unit, per_epoch)
                what = f"AdaptiveCompression(budget={peer.budget!r}, ...)" if peer is self._budget else \
                    f"GradientStabilityPruning({peer._describe()})"
                schedule.check_pruning_before(self._start_step, end, what)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any) -> None:
        started = (trainer.current_epoch >= self.start if isinstance(self.start, int)
                   else trainer.global_step >= self._start_step)
        if started and not self.active and (self._budget is None or self.budget_plan is None):  # plan: all float
            self._activate(trainer, pl_module)

    def _activate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fake quantizers on the planned layers (scales from the checkpoint when resuming), scales into the
        optimizer."""
        pending, self._pending = self._pending or {}, None
        resumed = "float_metric" in pending  # measured before this checkpoint, on the float model
        composed = self._budget is not None  # AdaptiveCompression judges the delivered codes itself
        self._float_metric = pending["float_metric"] if resumed else None if composed else \
            self._evaluate(trainer, pl_module)
        if compacted_resume.KEY in pending:  # a checkpoint written after the compaction at QAT's start
            prunings = [p for p in compression_callbacks(trainer) if isinstance(p, GradientStabilityPruning)]
            self._compacted_by, masks = compacted_resume.restore(trainer, prunings, pending[compacted_resume.KEY])
        else:
            masks = self._pruning_done(trainer, pl_module)
        plan = self._planned(trainer, pl_module, pending)
        self._keys = {name: weight_key(name, module) for name, module in plan.layers.items()}
        self.quantizers = prepare(pl_module, plan, masks, pending.get("scales"), pending.get("log_gains"))
        if self.activations is not None:
            self.input_quantizers = act.attach(plan.layers, self._keys, resumed=pending.get("activations"))
        rewrap_ddp(trainer)  # after every new parameter: DDP all-reduces the scales' gradients too
        scales = [q.log_gain for q in self.quantizers.values()] + [a.log_scale for a in self.input_quantizers.values()]
        saved, restarted = scales_group.linear_scales_resumed(pending, len(self.quantizers))
        if restarted:
            rank_zero_warn("QuantizationAwareTraining: this checkpoint holds linear weight scales (written before they "
                           "were learned in log space): the scales resume exactly, their optimizer moments restart")
        self._group = scales_group.add(trainer.optimizers[0], scales, self.scale_lr, saved)
        widths = f"the budget's plan ({plan.bits})" if composed else f"int{self.spec.bits} {self.spec.granularity}"
        rank_zero_info(f"QuantizationAwareTraining: {widths} fake quantization of {len(self.quantizers)} layers from "
                       f"step {trainer.global_step}")

    def _planned(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pending: dict[str, Any]) -> LayerPlan:
        """The layers and specs QAT trains: ``bits`` on this callback's coverage or, with AdaptiveCompression, its
        budget's plan on the masks reached (made now, or the one a resumed checkpoint holds)."""
        if self._budget is None:
            return self._plan(pl_module)
        saved = pending.get("budget_plan")
        self.budget_plan = BudgetPlan.from_state(saved) if saved else self._budget.plan_widths(trainer, pl_module)
        return layer_plan(pl_module, self.budget_plan.rows, self._budget.calibration)

    def _pruning_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The pruning masks QAT keeps in force. A structured ``compact=True`` pruning (over by now) is finished
        here, before the fake quantizers go on: the model is compacted, the optimizer follows the new parameters,
        and QAT trains the codes of the compacted layers (see :mod:`lightning_compress.qat.compaction`)."""
        masks: dict[str, Tensor] = {}
        for peer in compression_callbacks(trainer):
            if not isinstance(peer, GradientStabilityPruning):
                continue
            masks.update(peer.masks)
            if peer.config.compact and peer.unit_masks and not peer._compacted:
                before = dict(pl_module.named_parameters())
                peer._finish(trainer, pl_module)  # freezes the masks, fills the report, compacts
                follow_parameters(trainer.optimizers, before, pl_module)
                masks = masks_after(masks, pl_module)
                self._compacted_by = peer
        return masks

    # -- checkpoints -------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        plan = self.budget_plan.state() if self.budget_plan is not None else None
        if not self.active:  # a budget's plan keeping every layer float is kept too: a resume does not plan again
            return {"active": False, "budget_plan": plan}
        return {"active": True, "float_metric": self._float_metric,
                "scales": {self._keys[n]: q.base_scale.detach().cpu().clone() for n, q in self.quantizers.items()},
                "log_gains": {self._keys[n]: q.log_gain.detach().cpu().clone() for n, q in self.quantizers.items()},
                "activations": act.states(self.input_quantizers, self._keys),
                **({compacted_resume.KEY: compacted_resume.snapshot(self._compacted_by, self.quantizers, self._keys)}
                   if self._compacted_by is not None else {}),
                "budget_plan": plan}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) if state_dict.get("active") else None
        if self._pending is None and state_dict.get("budget_plan"):  # a plan keeping every layer float
            self.budget_plan = BudgetPlan.from_state(state_dict["budget_plan"])

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """While QAT runs: the model's own keys in the checkpoint, the scales' param group in this callback's
        state (a fresh optimizer has no such group, so Lightning could not restore it)."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if not self.active or self._group is None:
            return
        plain_keys(checkpoint["state_dict"], pl_module, list(self.quantizers))
        act.strip_keys(checkpoint["state_dict"])
        mine = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, self.state_dict())
        saved = scales_group.split(trainer.optimizers[0], self._group, checkpoint.get("optimizer_states") or [])
        if saved is not None:
            mine["optimizer"] = saved

    # -- end of fit --------------------------------------------------------------------------------------------
    def hand_over(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, QuantizedTensor]:
        """For AdaptiveCompression at the end of the fit: the codes trained (module name -> codes), the model left
        plain with its latent float (masked) weights; empty when QAT never started."""
        return self._take_off(trainer, pl_module) if self.active else {}

    def checkpoint_details(self) -> dict[str, Any]:
        return {} if self._budget is not None else super().checkpoint_details()  # AdaptiveCompression's details

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._budget is not None:  # AdaptiveCompression (finishing first) took the codes and delivered them
            return
        if self.active:
            self._codes = self._take_off(trainer, pl_module)
            self._reference_next = self._float_metric is not None
            compacted = self._compacted_by.report.files.get("compacted") if self._compacted_by else None
            if compacted is not None and trainer.is_global_zero:  # the float model as it ends, not as QAT began
                save_compacted(pl_module, compacted)
        else:
            rank_zero_warn("QuantizationAwareTraining: the fit ended before `start` was reached; the weights are "
                           "quantized after training (round to nearest, MSE calibration)")
        super()._finish(trainer, pl_module)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The trained input ranges of the layers delivered quantized (not those fallen back to float) join the
        codes the model carries, before the export writes both."""
        record = carried(pl_module)
        if record is not None:
            record.activations.update({k: r for k, r in self._ranges.items() if k in record.codes})
        super()._export(trainer, pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """PostTrainingQuantization's first measurement at the end of the fit ("before") is, for QAT, the float
        model's metric when QAT started (the latent weights it leaves are no float model to judge against)."""
        if self._reference_next:
            self._reference_next = False
            return self._float_metric
        return super()._evaluate(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A fit that fails mid-QAT leaves the model plain, holding its latent float weights."""
        self._drop_resume_check()
        if self.active:
            self._take_off(trainer, pl_module)

    def _take_off(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, QuantizedTensor]:
        """The codes; the parametrizations removed (latent float weights in place); the scales out of the
        optimizer, their moments with them."""
        codes = release(pl_module, self.quantizers)
        self._ranges = act.detach(pl_module, self.input_quantizers, self._keys)
        if self._group is not None:
            scales_group.remove(trainer.optimizers[0], self._group)
        self.quantizers, self._group, self.input_quantizers = {}, None, {}
        return codes

    def _first_pass(self, trainer: pl.Trainer, module: pl.LightningModule, plan: LayerPlan, keep: bool) -> LayerRungs:
        """The codes QAT trained, at their planned widths (other widths, for a fallback, rounded to nearest)."""
        states = super()._first_pass(trainer, module, plan, keep)
        for name, qtensor in self._codes.items():
            states.add(record(name, plan.layers[name], qtensor))
        return states


def budget_peer(trainer: pl.Trainer) -> CompressionCallback | None:
    """The AdaptiveCompression in the Trainer, if any (known by its marker: it imports this module)."""
    return next((c for c in compression_callbacks(trainer) if getattr(c, "plans_widths", False)), None)

