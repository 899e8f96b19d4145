"""Streaming statistics of gradients over optimizer steps. Pure PyTorch: no Lightning import.

Two granularities, chosen per use:

* **per weight** (``per_weight=True``): the mean and standard deviation over steps of every gradient element.
  Each step costs three fused ``torch._foreach_*`` passes over the gradients: ``d = g - mean`` (shifted by the
  running mean, which is constant within a window; the first window is shifted by the first gradient), then
  ``S += d`` and ``Q += d*d`` into short float32 *window* sums. Every ``merge_every`` counted steps (and before
  any read) the window is merged into the running float32 mean / M2 with Chan et al.'s parallel-variance
  formula. The shift is what makes it numerically sound: ``Q - S^2/n`` of *shifted* values does not cancel even
  when ``|mean| >> std`` (raw sums of ``g`` and ``g^2`` in fp32 lose the variance entirely there), and the
  long-run accumulation is the stable Chan update, not an ever-growing raw sum. Memory: four float32 buffers
  per tracked weight (window S, Q; running mean, M2), which is why the per-unit mode exists.
* **per unit** (``per_unit=True``; costs almost nothing in memory): for each output unit (row of a Linear weight, output channel
  of a Conv weight) two per-step signals, Welford-accumulated in float64:
  ``rms`` = root-mean-square of the unit's gradient (near zero and stable => the unit is unimportant) and
  ``taylor`` = ``sum_j w_ij * g_ij``, the first-order change of the loss if the unit were removed
  (Molchanov et al., 2019: importance ``E[(sum w*g)^2]``).

A step whose gradients contain NaN/inf (e.g. an fp16 step the GradScaler will skip) is not counted: finiteness is
checked (on the per-unit signals, or on ``torch._foreach_norm`` of the gradients) before anything is accumulated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class _Welford:
    """Running count / mean / M2 of a float64 vector, updated one sample at a time."""

    def __init__(self, size: int) -> None:
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        x = x.to(self.mean.device, torch.float64)
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    def std(self) -> Tensor:
        return (self.m2 / max(self.count, 1)).clamp_min(0).sqrt()

    def to(self, device: torch.device) -> None:
        self.mean, self.m2 = self.mean.to(device), self.m2.to(device)


def unit_view(t: Tensor) -> Tensor:
    """(out, *rest) -> (out, prod(rest)): one row per output unit (neuron / output channel)."""
    return t.reshape(t.shape[0], -1)


class GradientStatistics:
    """Running gradient statistics for a fixed, ordered set of weight tensors.

    ``names`` label the tensors; ``sizes`` are their shapes. Call :meth:`update` once per optimizer step with the
    gradients (and weights) in the same order.
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        *,
        per_weight: bool,
        per_unit: bool = True,
        device: torch.device | str = "cpu",
        merge_every: int = 32,
    ) -> None:
        if merge_every < 1:
            raise ValueError(f"`merge_every` must be >= 1, got {merge_every}")
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        if not (per_weight or per_unit):
            raise ValueError("track at least one of per-weight and per-unit statistics")
        self.per_weight = per_weight
        self.per_unit = per_unit
        self.merge_every = merge_every
        self.device = torch.device(device)
        self.units = [s[0] for s in self.shapes]
        total_units = sum(self.units)
        self.unit_rms = _Welford(total_units)
        self.unit_taylor = _Welford(total_units)
        self.unit_rms.to(self.device)
        self.unit_taylor.to(self.device)
        self.skipped_steps = 0
        self.count = 0  # counted steps
        if per_weight:
            zeros = lambda: [torch.zeros(s, dtype=torch.float32, device=self.device) for s in self.shapes]  # noqa: E731
            self._win_sum, self._win_sumsq = zeros(), zeros()
            self._mean, self._m2 = zeros(), zeros()
            self._win_count = 0
            self._merged_count = 0

    # ------------------------------------------------------------------ update
    @torch.no_grad()  # called from on_after_backward with autograd on: never build a graph across steps
    def update(self, grads: Sequence[Tensor], weights: Sequence[Tensor], grad_scale: float = 1.0) -> bool:
        """Accumulate one optimizer step. ``grad_scale`` is the loss scale the gradients still carry (AMP);
        it is divided out. Returns False (and counts nothing) if any gradient is NaN/inf."""
        inv = 1.0 / grad_scale
        if self.per_unit:
            rms, taylor = [], []
            for g, w in zip(grads, weights):
                g2 = unit_view(g)
                rms.append(torch.linalg.vector_norm(g2, dim=1, dtype=torch.float32) / (g2.shape[1] ** 0.5))
                taylor.append(torch.linalg.vecdot(unit_view(w).float(), g2.float(), dim=1))
            rms_all, taylor_all = torch.cat(rms), torch.cat(taylor)
            finite = bool(torch.isfinite(rms_all).all() & torch.isfinite(taylor_all).all())
        else:
            finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(list(grads)))).all())
        if not finite:
            self.skipped_steps += 1
            return False
        if self.per_unit:
            self.unit_rms.update(rms_all * inv)
            self.unit_taylor.update(taylor_all * inv)
        if self.per_weight:
            if grad_scale != 1.0:
                grads = torch._foreach_mul(list(grads), inv)
            grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
            if self._merged_count == 0 and self._win_count == 0:
                for shift, g in zip(self._mean, grads):  # first counted step: shift by the first gradient
                    shift.copy_(g)
            shifted = torch._foreach_sub(grads, self._mean)
            torch._foreach_add_(self._win_sum, shifted)
            torch._foreach_addcmul_(self._win_sumsq, shifted, shifted)
            self._win_count += 1
            if self._win_count >= self.merge_every:
                self._merge_window()
        self.count += 1
        return True

    def _merge_window(self) -> None:
        """Chan et al.: merge the window (n_b values shifted by the running mean) into the running (n_a, mean, M2)."""
        n_b = self._win_count
        if n_b == 0:
            return
        n_a = self._merged_count
        n = n_a + n_b
        delta = torch._foreach_div(self._win_sum, float(n_b))  # window mean - running mean
        m2_b = torch._foreach_sub(self._win_sumsq, torch._foreach_mul(self._win_sum, delta))
        torch._foreach_clamp_min_(m2_b, 0.0)
        torch._foreach_add_(self._mean, torch._foreach_mul(delta, n_b / n))
        torch._foreach_add_(self._m2, m2_b)
        torch._foreach_addcmul_(self._m2, delta, delta, value=n_a * n_b / n)
        for buf in (*self._win_sum, *self._win_sumsq):
            buf.zero_()
        self._win_count = 0
        self._merged_count = n

    # ------------------------------------------------------------------ read
    def weight_mean(self) -> list[Tensor]:
        self._require_per_weight()
        self._merge_window()
        return [m.clone() for m in self._mean]

    def weight_std(self) -> list[Tensor]:
        """Population standard deviation over the counted steps (0 before two steps)."""
        self._require_per_weight()
        self._merge_window()
        n = max(self._merged_count, 1)
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
        return self._split(self.unit_rms.mean.clone())

    def unit_rms_std(self) -> list[Tensor]:
        self._require_per_unit()
        return self._split(self.unit_rms.std())

    def unit_taylor_second_moment(self) -> list[Tensor]:
        """E[(sum_j w_ij g_ij)^2] per unit = mean^2 + variance."""
        self._require_per_unit()
        w = self.unit_taylor
        return self._split(w.mean.square() + w.m2 / max(w.count, 1))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state: dict = {
            "names": list(self.names),
            "count": self.count,
            "skipped_steps": self.skipped_steps,
            "unit": {
                key: {"count": w.count, "mean": w.mean.detach().cpu().clone(), "m2": w.m2.detach().cpu().clone()}
                for key, w in (("rms", self.unit_rms), ("taylor", self.unit_taylor))
            },
        }
        if self.per_weight:  # the window is saved as it is, so a resumed run merges at the same steps
            state["weight"] = {
                "format": "shifted-window-v1",
                "count": self._merged_count,
                "window_count": self._win_count,
                **{
                    key: [t.cpu().clone() for t in bufs]
                    for key, bufs in (
                        ("mean", self._mean),
                        ("m2", self._m2),
                        ("window_sum", self._win_sum),
                        ("window_sumsq", self._win_sumsq),
                    )
                },
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
        for key, w in (("rms", self.unit_rms), ("taylor", self.unit_taylor)):
            w.count = int(state["unit"][key]["count"])
            w.mean = state["unit"][key]["mean"].to(self.device, torch.float64).clone()
            w.m2 = state["unit"][key]["m2"].to(self.device, torch.float64).clone()
        weight = state.get("weight")
        if self.per_weight:
            if weight is None:
                raise ValueError("the checkpoint holds no per-weight statistics, but this run needs them")
            if weight.get("format") != "shifted-window-v1":
                raise ValueError("the checkpoint's per-weight statistics use an unknown format")
            self._merged_count = int(weight["count"])
            self._win_count = int(weight["window_count"])
            for key, bufs in (
                ("mean", self._mean),
                ("m2", self._m2),
                ("window_sum", self._win_sum),
                ("window_sumsq", self._win_sumsq),
            ):
                for dst, src in zip(bufs, weight[key]):
                    dst.copy_(src)
