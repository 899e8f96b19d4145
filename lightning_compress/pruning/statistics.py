"""Streaming statistics of gradients over optimizer steps. Pure PyTorch: no Lightning import.

Two granularities, chosen per use:

* **per weight** (``per_weight=True``): the mean and standard deviation over steps of every gradient element, by
  Welford's update in float32, which is shifted by the running mean at every step and so stays accurate when
  ``|mean| >> std`` (raw fp32 sums of ``g`` and ``g^2`` lose the variance entirely there; float64 sums would keep
  it but double the state, and CPU kernels that mix float32 and float64 are not vectorized: far slower than the
  whole Welford step). With ``d = g - mean`` the update ``mean += d/n``, ``M2 += d*d*(n-1)/n``
  is three elementwise ops, the fewest that eager PyTorch allows (no single op reads ``g`` and writes both sums).
  Memory: two float32 buffers per tracked weight (mean, M2), plus one scratch block. The buffers are flat and the
  gradients are processed in blocks (on CPU at most ``BLOCK`` elements, small tensors sharing one, sized so that
  ``d`` and the block of the mean stay in a core's L2 cache between the three ops) through that reused scratch
  buffer, so a step allocates nothing and a small model costs a handful of ops whatever its number of layers.
* **per unit** (``per_unit=True``; costs almost nothing in memory): for each output unit (row of a Linear weight,
  output channel of a Conv weight) two per-step signals, written in place into a block of 32 stored samples and
  merged into a float64 mean / M2 when the block is full: ``rms`` = root-mean-square of the unit's gradient (near
  zero and stable => the unit is unimportant) and ``taylor`` = ``sum_j w_ij * g_ij``, the first-order change of the
  loss if the unit were removed (Molchanov et al., 2019: importance ``E[(sum w*g)^2]``).

**Sampling** (``weight_every=k``): the per-weight statistics take every k-th counted step only (the first after a
reset, then every k-th; a sampled step that is refused hands its turn to the next one). The mean and variance over
steps stay unbiased estimates, from k times fewer samples, and the per-weight update costs 1/k on average: the three
ops above read and write far less than an Adam step, but not little enough for every model (the figures, and what
k does to the masks on real fits, are in ``benchmarks/bench_stats_overhead.py`` and
``benchmarks/bench_stats_sampling.py``). Without per-unit statistics the steps in between are not read at all, so a
NaN there is neither seen nor counted as skipped; the per-unit statistics, when tracked, still read every step.

``torch.compile`` of the per-weight step fuses the three ops into one loop and is faster per step on CPU, but its
first compile delays the first step by far more than a short fine-tune saves, and needs a C++ compiler at run time:
not used (``benchmarks/bench_stats_overhead.py`` has the figures).

Steps that are not counted (``update`` returns False, ``skipped_steps`` grows, nothing is accumulated):

* a step whose gradients contain NaN/inf (e.g. an fp16 step the GradScaler will skip);
* a *huge* step: one where, after dividing out the loss scale, some per-unit signal exceeds :data:`MAX_STEP`
  (1e15) or the shifted gradients ``d = g - mean`` may: with one block the check is ``||d||_2 <= MAX_STEP``, with
  several it is ``||g||_2 <= MAX_STEP / 2`` for every gradient tensor, made before any block is touched (this bounds
  every ``|d|`` by ``MAX_STEP`` as the mean is an average of such gradients). An L2 norm bounds every element and,
  unlike a max-abs reduction, runs at memory speed (a BLAS dot, one ``torch._foreach_norm`` for all layers); it is
  stricter than a max-abs check only for gradients beyond ``MAX_STEP / (2 sqrt(numel))`` (5e10 for a tensor of 1e8
  weights), far beyond any real gradient. Such a step is a divergence, not information: counted, its ``d*d`` (up
  to 3e38 for a finite float32 ``d``) would overflow the float32 M2 to ``inf`` and every later std of that weight
  would stay ``inf``. Skipping (not clipping) keeps the mean and std those of the ordinary steps, as the GradScaler
  does for an overflowing step.
  With every counted ``|d| <= 1e15`` each step adds at most 1e30 to M2, so the statistics stay finite for 3e8
  counted steps.

The checks are made before anything is accumulated, so a skipped step changes nothing. A checkpoint whose per-weight
statistics are not finite (written before this check existed) is not loaded as it is: the statistics restart from
zero steps, with a warning.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_compress.core._compat import foreach_copy_
from lightning_compress.core.validation import check_number
from lightning_compress.pruning.moments import BLOCK, blocks, largest_norm, peak
from lightning_compress.pruning.moments import RunningMoments as _RunningMoments
from lightning_compress.pruning.moments import copy_checked as _copy_checked

MAX_STEP = 1e15  # largest |g - mean| (and per-unit signal) of a counted step; see the module docstring
_WEIGHT_FORMAT = "welford-v2"  # per-weight state: running mean and M2 of weight_count sampled steps
_UNIT_ROWS = ("rms", "taylor")  # the per-unit signals: the unit's gradient rms, and sum_j w_ij g_ij


def unit_view(t: Tensor) -> Tensor:
    """(out, *rest) -> (out, prod(rest)): one row per output unit (neuron / output channel)."""
    return t.reshape(t.shape[0], -1)


class GradientStatistics:
    """Running gradient statistics for a fixed, ordered set of weight tensors.

    ``names`` label the tensors; ``sizes`` are their shapes. Call :meth:`update` once per optimizer step with the
    gradients (and weights) in the same order. ``weight_every=k`` folds every k-th counted step into the per-weight
    statistics (see the module docstring); ``weight_count`` says how many they hold.
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        *,
        per_weight: bool,
        per_unit: bool = True,
        device: torch.device | str = "cpu",
        weight_every: int = 1,
    ) -> None:
        check_number("weight_every", weight_every, low=1, integer=True)
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        if not (per_weight or per_unit):
            raise ValueError("track at least one of per-weight and per-unit statistics")
        self.per_weight = per_weight
        self.per_unit = per_unit
        self.weight_every = weight_every
        self.device = torch.device(device)
        self.units = [s[0] for s in self.shapes]
        row_sizes = [math.prod(s[1:]) for s in self.shapes]  # elements per unit
        self._sqrt_row = torch.cat(
            [torch.full((u,), k**0.5, dtype=torch.float32) for u, k in zip(self.units, row_sizes)]
        ).to(self.device)
        on_cpu = self.device.type == "cpu"
        self._blocks = blocks([s.numel() for s in self.shapes], BLOCK if on_cpu else None)
        ends = list(itertools.accumulate(self.units))
        self._unit_ranges = list(zip([0, *ends[:-1]], ends))  # each tensor's units in the flat (units,) rows
        # reused buffers, allocated once: one block of shifted gradients (per weight), w*g of a row block (per unit)
        self._scratch = torch.empty(max(end - start for start, end, _ in self._blocks) if per_weight else 0,
                                    device=self.device)
        widest = max(math.prod(s[1:]) for s in self.shapes)
        self._unit_scratch = torch.empty(max(BLOCK, widest)) if per_unit and on_cpu else None
        self.reset()

    def reset(self) -> None:
        """Forget every counted step (e.g. after a pruning event, to collect statistics of the pruned network)."""
        self._unit = _RunningMoments((len(_UNIT_ROWS), sum(self.units)), self.device)
        if self.per_unit:
            self._plan_units()
        self.skipped_steps = 0
        self.count = 0  # counted steps
        self.weight_count = 0  # of which, steps sampled into the per-weight statistics (every ``weight_every``-th)
        if self.per_weight:  # flat float32 buffers (one op per block), read through per-tensor views
            total = sum(s.numel() for s in self.shapes)
            self._flat = {key: torch.zeros(total, dtype=torch.float32, device=self.device) for key in ("mean", "m2")}
            self._mean, self._m2 = (self._views(b) for b in self._flat.values())

    def _views(self, flat: Tensor) -> list[Tensor]:
        parts = torch.split(flat, [s.numel() for s in self.shapes])
        return [part.view(shape) for part, shape in zip(parts, self.shapes)]

    # ------------------------------------------------------------------ update
    @torch.no_grad()  # called from on_after_backward with autograd on: never build a graph across steps
    def update(self, grads: Sequence[Tensor], weights: Sequence[Tensor], grad_scale: float = 1.0) -> bool:
        """Accumulate one optimizer step. ``grad_scale`` is the loss scale the gradients still carry (AMP);
        it is divided out. Returns False (and counts nothing) if any gradient is NaN/inf or the step is huge
        (beyond :data:`MAX_STEP`, see the module docstring); a step between per-weight samples, without per-unit
        statistics, is counted unread."""
        inv = 1.0 / grad_scale
        sampled = self.per_weight and self.count % self.weight_every == 0
        if self.per_unit:  # written into the next pending sample, committed only once the whole step is counted
            signals = self._unit_signals(grads, weights)
            if not peak(signals) * inv <= MAX_STEP:  # NaN compares False: skipped too
                self.skipped_steps += 1
                return False
        if sampled:
            if not self._welford_step(grads, inv):
                self.skipped_steps += 1
                return False
            self.weight_count += 1
        if self.per_unit:
            if inv != 1.0:
                signals.mul_(inv)
            self._unit.commit()
        self.count += 1
        return True

    def _unit_signals(self, grads: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
        """(2, units), in place in the next pending sample: each unit's gradient rms and its ``sum_j w_ij g_ij``.
        One norm per layer; the dot products go through a reused product buffer in row blocks on CPU, so that the
        product stays in cache and no step allocates (except to widen 16-bit weights). Row reductions have no
        ``torch._foreach_*`` form, hence the loop over layers: two ops per layer (three off CPU), every output view
        made once in :meth:`_plan_units`."""
        for (rms, chunks), g, w in zip(self._unit_plan[self._unit.n_pending], grads, weights):
            g2, w2 = (g, w) if g.dim() == w.dim() == 2 else (unit_view(g), unit_view(w))
            if g2.dtype == torch.float32:
                torch.linalg.vector_norm(g2, dim=1, out=rms)
            else:
                torch.linalg.vector_norm(g2, dim=1, dtype=torch.float32, out=rms)
            for lo, hi, dots, product in chunks:
                w_rows, g_rows = (w2, g2) if len(chunks) == 1 else (w2[lo:hi], g2[lo:hi])
                if product is None:  # off CPU: one fused product-sum per layer
                    torch.linalg.vecdot(w_rows.float(), g_rows.float(), dim=1, out=dots)
                    continue
                if g2.dtype == w2.dtype == torch.float32:
                    torch.mul(w_rows, g_rows, out=product)
                else:  # 16-bit: widened into the buffer, products exact in float32
                    product.copy_(g_rows).mul_(w_rows)
                torch.sum(product, 1, out=dots)
        signals = self._unit.slot()
        signals[0].div_(self._sqrt_row)
        return signals

    def _plan_units(self) -> None:
        """For each pending sample and layer, the views the per-unit update writes: the layer's rms entries and, per
        block of rows, its dot-product entries and the block's product buffer (slicing them at every step costs about
        as much as the ops on a small layer)."""
        scratch = self._unit_scratch
        plan = []
        for slot in self._unit.pending:
            layers = []
            for (lo, hi), shape in zip(self._unit_ranges, self.shapes):
                k = math.prod(shape[1:])
                rows = hi - lo if scratch is None else max(1, BLOCK // k)
                chunks = [(r, min(r + rows, hi - lo)) for r in range(0, hi - lo, rows)]
                layers.append((slot[0, lo:hi], [(r0, r1, slot[1, lo + r0 : lo + r1],
                                                 None if scratch is None else scratch[: (r1 - r0) * k].view(-1, k))
                                                for r0, r1 in chunks]))
            plan.append(layers)
        self._unit_plan = plan

    def _welford_step(self, grads: Sequence[Tensor], inv: float) -> bool:
        """Welford, block by block: ``d = g*inv - mean``, ``mean += d/n``, ``M2 += d*d*(n-1)/n``. On CPU a block is
        at most ``BLOCK`` elements, so ``d`` and the block of ``mean`` stay in the core's cache between the three
        ops and memory sees one read of ``g`` and one read-modify-write of ``mean`` and of ``M2``. Nothing is
        changed unless the whole step is finite and not huge: a single block is checked on ``||d||_2 <= MAX_STEP``
        (a BLAS dot of ``d`` in cache), several are checked first on the gradients, ``||g||_2 <= MAX_STEP / 2`` per
        tensor (one ``torch._foreach_norm`` for all layers, one read pass); either bounds every ``|d|``."""
        single = len(self._blocks) == 1
        if not single and not largest_norm(grads) * inv <= MAX_STEP / 2:  # NaN compares False
            return False
        n = self.weight_count + 1
        for start, end, parts in self._blocks:
            d = self._shifted(grads, inv, start, end, parts)
            if single and not float(torch.dot(d, d)) <= MAX_STEP**2:
                return False
            self._flat["mean"][start:end].add_(d, alpha=1.0 / n)
            self._flat["m2"][start:end].addcmul_(d, d, value=(n - 1) / n)
        return True

    def _shifted(self, grads: Sequence[Tensor], inv: float, start: int, end: int, parts: list) -> Tensor:
        """The block ``[start, end)`` of the flattened ``g*inv - mean``, in the scratch buffer."""
        d = self._scratch[: end - start]
        shift = self._flat["mean"][start:end]
        if len(parts) == 1 and inv == 1.0:
            index, lo, hi = parts[0]
            return torch.sub(grads[index].reshape(-1)[lo:hi], shift, out=d)
        sources = [grads[i].reshape(-1) if hi - lo == grads[i].numel() else grads[i].reshape(-1)[lo:hi]
                   for i, lo, hi in parts]
        if len(parts) == 1:
            d.copy_(sources[0])
        elif all(t.dtype == d.dtype for t in sources):
            torch.cat(sources, out=d)
        else:  # 16-bit gradients: converted while copied
            foreach_copy_(list(torch.split(d, [hi - lo for _, lo, hi in parts])), sources)
        if inv != 1.0:
            d.mul_(inv)
        return d.sub_(shift)

    # ------------------------------------------------------------------ read
    def weight_mean(self) -> list[Tensor]:
        self._require_per_weight()
        return [m.clone() for m in self._mean]

    def weight_std(self) -> list[Tensor]:
        """Population standard deviation over the sampled steps (0 before two of them)."""
        self._require_per_weight()
        n = max(self.weight_count, 1)
        return [(m2 / n).sqrt() for m2 in self._m2]

    def _require_per_weight(self) -> None:
        if not self.per_weight:
            raise RuntimeError("per-weight statistics were not tracked (per_weight=False)")

    def _split(self, flat: Tensor) -> list[Tensor]:
        return list(torch.split(flat, self.units))

    def _require_per_unit(self) -> None:
        if not self.per_unit:
            raise RuntimeError("per-unit statistics were not tracked (per_unit=False)")

    def unit_rms_mean(self) -> list[Tensor]:
        self._require_per_unit()
        return self._split(self._unit.mean[0].clone())

    def unit_rms_std(self) -> list[Tensor]:
        self._require_per_unit()
        return self._split(self._unit.variance()[0].sqrt())

    def unit_taylor_second_moment(self) -> list[Tensor]:
        """E[(sum_j w_ij g_ij)^2] per unit = mean^2 + variance."""
        self._require_per_unit()
        return self._split(self._unit.mean[1].square() + self._unit.variance()[1])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state: dict = {
            "names": list(self.names),
            "count": self.count,
            "skipped_steps": self.skipped_steps,
            "unit": self._unit.state_dict(_UNIT_ROWS),
        }
        if self.per_weight:
            state["weight"] = {
                "format": _WEIGHT_FORMAT,
                "count": self.weight_count,
                "mean": [t.cpu().clone() for t in self._mean],
                "m2": [t.cpu().clone() for t in self._m2],
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                "gradient statistics in the checkpoint were taken for layers "
                f"{state['names']}, but this run tracks {self.names}"
            )
        self.count = int(state["count"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._unit.load_state_dict(state["unit"], _UNIT_ROWS)
        weight = state.get("weight")
        if self.per_weight:
            if weight is None:
                raise ValueError("the checkpoint holds no per-weight statistics, but this run needs them")
            if weight.get("format") != _WEIGHT_FORMAT:
                raise ValueError(
                    f"the checkpoint's per-weight statistics use the format {weight.get('format')!r}, this version "
                    f"reads {_WEIGHT_FORMAT!r} (earlier development versions stored shifted window sums)"
                )
            for key, bufs in (("mean", self._mean), ("m2", self._m2)):
                _copy_checked(f"per-weight {key}", bufs, weight[key], self.names)
            self.weight_count = int(weight.get("count", self.count))  # absent before sampling: every step counted
        unit = self._unit
        held = [unit._mean, unit._m2, unit.pending[: unit.n_pending], *(self._flat.values() if self.per_weight else ())]
        if not all(bool(t.isfinite().all()) for t in held):
            warnings.warn(
                "the checkpoint's gradient statistics hold NaN/inf (a huge step counted by an earlier version); "
                f"they restart from zero steps (were {self.count})", RuntimeWarning, stacklevel=2
            )
            self.reset()

