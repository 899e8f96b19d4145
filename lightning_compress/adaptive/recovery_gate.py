"""The metric gate of whole-unit pruning inside a fit, judged after recovery. No Lightning import.

Right after a structured event the model has had no training to adapt to the units it lost, and whole units cost
several points at that moment that some training gives back: a gate measured then refuses every event. So each
structured event is *held*: it is kept at once, with a snapshot of what it pruned (the values at the positions it
zeroed, the previous masks, the BatchNorm running statistics of the units it removed), and the events held are
judged together by the metric of a later validation, once the model has trained since the newest of them (and at
the end of the fit). Within the bound they stay; outside it the newest, which had the least time to recover, is
undone (the pruned units' weights and statistics back from its snapshot, the masks as they were before it) and the
older ones stay held for the next verdict; each family it shrank is capped halfway between the units it kept
before and after it (the controller's back-off by halves: a step refused twice is capped at a quarter, and so on),
so the plan is solved again taking fewer of them. (Undoing everything held at once undid a whole ramp of the
ResNet benchmark at a verdict soon after its newest event.)

What is held stays small, since it is in memory and in every checkpoint until the verdict: nothing at all when no
verdict can refuse (no bound, or no metric to judge by: the caller holds nothing then), and per event the unit
masks, the values it zeroed and the BatchNorm statistics of its units; the parameter masks only when they do not
follow from the unit masks (:func:`~lightning_compress.pruning.planner.expand_masks`), never a copy of every
parameter's mask per event.

The decision is made on the metric every rank measured together (reduced over the ranks) and on masks every rank
holds alike, so every rank undoes the same events; the held snapshots are plain CPU tensors in the checkpoint, so a
resumed fit judges the events the interrupted one held.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.gate import MetricGate, Verdict
from lightning_compress.pruning.planner import expand_masks
from lightning_compress.pruning.state import MaskState

RUNNING = ("running_mean", "running_var")  # BatchNorm statistics of a unit: restored with its weights


@dataclass
class Held:
    """One structured event waiting for its verdict: what undoing it needs."""

    tick: int
    step: int
    reference: float | None  # the metric it is judged against
    shrunk: dict[str, tuple[int, int]]  # family -> units it kept (before, after) the event, where it shrank
    masks: dict[str, Tensor] | None  # parameter keep-masks before the event; None: they follow from unit_masks
    unit_masks: dict[str, Tensor]  # unit keep-masks before the event
    values: dict[str, Tensor]  # parameter -> its values at the positions the event zeroed (1-D, CPU)
    buffers: dict[str, Tensor] = field(default_factory=dict)  # "<module>.<buffer>" -> values of the units removed

    def state_dict(self) -> dict[str, Any]:
        return {"tick": self.tick, "step": self.step, "reference": self.reference, "shrunk": dict(self.shrunk),
                "masks": None if self.masks is None else dict(self.masks), "unit_masks": dict(self.unit_masks),
                "values": dict(self.values),
                "buffers": dict(self.buffers)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Held:
        return cls(int(state["tick"]), int(state["step"]), state.get("reference"),
                   {str(k): (int(v[0]), int(v[1])) for k, v in dict(state["shrunk"]).items()},
                   None if state.get("masks") is None else dict(state["masks"]),
                   dict(state["unit_masks"]), dict(state["values"]), dict(state.get("buffers", {})))


def _removed(before: Mapping[str, Tensor], after: Mapping[str, Tensor], key: str, like: Tensor) -> Tensor:
    """Where the keep-mask ``key`` went from kept (``before``; absent: all kept) to pruned (``after``)."""
    old = before.get(key)
    old = torch.ones_like(like, dtype=torch.bool) if old is None else old.to(like.device).bool()
    new = after.get(key)
    new = torch.ones_like(old) if new is None else new.to(like.device).bool()
    return old & ~new


def _unit_buffers(state: MaskState, families: Mapping[str, list[str]],
                  removed: Mapping[str, Tensor]) -> dict[str, tuple[nn.Module, str, Tensor]]:
    """``"<module>.<buffer>"`` -> (module, buffer name, unit indices) for the running statistics of the followers
    of every family member whose units ``removed`` holds (per family: bool over its units)."""
    modules = dict(state.model.named_modules())
    out: dict[str, tuple[nn.Module, str, Tensor]] = {}
    for name, gone in removed.items():
        index = gone.nonzero().flatten().cpu()
        for member in families[name]:
            group = (state.groups or {}).get(member)
            for follower in getattr(group, "followers", ()):
                module = modules[follower]
                for buffer in RUNNING:
                    value = getattr(module, buffer, None)
                    if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == gone.numel():
                        out[f"{follower}.{buffer}"] = (module, buffer, index)
    return out


def _expanded(state: MaskState, unit_masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The parameter keep-masks that ``unit_masks`` (CPU) stand for on ``state``'s model."""
    return expand_masks(state.model, {n: m.bool() for n, m in unit_masks.items()}, state.groups)


def _follows(state: MaskState, masks: Mapping[str, Tensor], unit_masks: Mapping[str, Tensor]) -> bool:
    """Whether the parameter masks ``masks`` are exactly those ``unit_masks`` expand to (then only those are held)."""
    expanded = _expanded(state, {n: m.cpu() for n, m in unit_masks.items()})
    return set(expanded) == set(masks) and all(torch.equal(expanded[n].cpu().bool(), masks[n].cpu().bool())
                                               for n in masks)


class RecoveryGate:
    """Holds the structured events until a validation after some training, then keeps or undoes them together
    (module docstring). ``caps``: family -> fewest units it may keep; ``log``: one line per verdict."""

    def __init__(self) -> None:
        self.held: list[Held] = []  # oldest first
        self.caps: dict[str, int] = {}
        self.log: list[str] = []

    def hold(self, state: MaskState, undo: Mapping[str, Any], families: Mapping[str, list[str]],
             kept_before: Mapping[str, int], kept_after: Mapping[str, int], tick: int, step: int,
             reference: float | None) -> None:
        """After ``state.try_masks`` returned ``undo`` at the event (``tick``, ``step``): keep what undoing it
        needs. ``kept_before`` / ``kept_after``: units each family kept around the event."""
        before_masks, before_units = undo["masks"], undo["unit_masks"]
        values = {}
        for name, old in undo["weights"].items():
            gone = _removed(before_masks, state.masks, name, old)
            values[name] = old[gone].detach().cpu().clone()
        shrunk = {n: (int(kept_before[n]), int(kept_after[n])) for n in families if kept_after[n] < kept_before[n]}
        removed = {n: _removed(before_units, state.unit_masks, n, state.unit_masks[n]) for n in shrunk
                   if n in state.unit_masks}
        buffers = {key: getattr(module, buffer)[index].detach().cpu().clone()
                   for key, (module, buffer, index) in _unit_buffers(state, families, removed).items()}
        masks = None if _follows(state, before_masks, before_units) else \
            {n: m.cpu().clone() for n, m in before_masks.items()}
        self.held.append(Held(tick, step, reference, shrunk, masks,
                              {n: m.cpu().clone() for n, m in before_units.items()}, values, buffers))

    def settle(self, state: MaskState, gate: MetricGate, metric: float | None,
               families: Mapping[str, list[str]]) -> tuple[Verdict, list[Held]] | None:
        """The held events judged by ``metric`` (measured after recovery): all kept, or the newest (the one with
        the least recovery) undone and its families capped, the older ones held for the next verdict. Returns the
        verdict and the events it settled, or None when none was held."""
        held = self.held
        if not held:
            return None
        verdict = gate.judge(held[0].reference, metric)
        what = f"events at steps {[h.step for h in held]}"
        after = "not measured" if metric is None else f"{metric:.4g}"
        if verdict.accepted:
            self.held = []
            self.log.append(f"{what}: after recovery the metric is {after} (drop {_drop(verdict)}): kept")
            return verdict, held
        newest = held[-1]
        self.undo(state, newest, families)
        self.held = held[:-1]
        capped = {name: last + -(-(first - last) // 2) for name, (first, last) in newest.shrunk.items()}
        for name, kept in capped.items():
            self.caps[name] = max(self.caps.get(name, 0), kept)
        said = ", ".join(f"{n} at {k} units" for n, k in sorted(capped.items())) or "none"
        rest = f"; {[h.step for h in self.held]} still held" if self.held else ""
        self.log.append(f"{what}: after recovery the metric is {after} ({verdict.reason}): the newest (step "
                        f"{newest.step}) undone, its units restored from its snapshot; capped {said}{rest}")
        return verdict, [newest]

    @torch.no_grad()
    def undo(self, state: MaskState, held: Held, families: Mapping[str, list[str]]) -> None:
        """The held event's masks back, and the values it zeroed (weights, BatchNorm statistics) restored."""
        params = dict(state.model.named_parameters(remove_duplicate=False))
        masks = held.masks if held.masks is not None else _expanded(state, held.unit_masks)
        removed = {n: _removed(held.unit_masks, state.unit_masks, n, state.unit_masks[n]) for n in held.shrunk
                   if n in state.unit_masks}
        where = {}
        for name, values in held.values.items():
            param = params.get(name)
            gone = None if param is None else _removed(masks, state.masks, name, param)
            if param is None or gone is None or int(gone.sum()) != values.numel():
                raise ValueError(f"the held pruning event at step {held.step} does not fit parameter {name!r} (its "
                                 "snapshot and the masks disagree): the checkpoint belongs to another model")
            where[name] = (param, gone)
        for name, values in held.values.items():
            param, gone = where[name]
            param[gone] = values.to(param.device, param.dtype)
        for key, (module, buffer, index) in _unit_buffers(state, families, removed).items():
            if key in held.buffers:
                getattr(module, buffer)[index.to(getattr(module, buffer).device)] = held.buffers[key].to(
                    getattr(module, buffer).device)
        state.masks = {n: m.bool() for n, m in masks.items()}
        state.unit_masks = {n: m.bool() for n, m in held.unit_masks.items()}
        state.bind()

    def state_dict(self) -> dict[str, Any]:
        return {"held": [h.state_dict() for h in self.held], "caps": dict(self.caps), "log": list(self.log)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.held = [Held.from_state(h) for h in state.get("held") or []]
        self.caps = {str(k): int(v) for k, v in dict(state.get("caps", {})).items()}
        self.log = [str(line) for line in state.get("log", [])]


def _drop(verdict: Verdict) -> str:
    return "not measured" if verdict.drop is None else f"{verdict.drop:.4g}"
