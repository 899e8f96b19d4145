"""The table a latency plan is reported as (``CompressionResult.plan``): per family its units and int8 producers, the
other int8 layers, the layers stored narrower, and the width each layer's codes are carried at. No Lightning
import."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.latency_plan import LatencyProblem
from lightning_compress.adaptive.units import UnitCandidate
from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.quantization.carried import carried


def plan_rows(problem: LatencyProblem, plan: Mapping[str, UnitCandidate], int8: frozenset[str] = frozenset(),
              widths: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The plan as a table: per family, its producers, units kept of all, the producers on int8 kernels (at the
    narrower width ``widths`` gives, where it gives one) and the predicted loss increase; then each other layer
    chosen int8, then each other layer ``widths`` stores weight-only."""
    widths = widths or {}
    rows = []
    for name, c in plan.items():
        chosen = [m for m in problem.members[name] if m in int8]
        narrower = [f"{m} {widths[m]}" for m in problem.members[name] if m in widths]
        label = f"{c.kept}/{c.units} units" + (f", int8 {chosen}" if chosen else "") + \
            (f", {', '.join(narrower)}" if narrower else "")
        rows.append({"layer": name, "members": problem.members[name], "units": c.units, "kept": c.kept, "int8": chosen,
                     "predicted": c.score + sum(problem.int8_scores[m] for m in chosen), "label": label})
    covered = {m for members in problem.members.values() for m in members}
    for name in sorted(int8 - covered):
        units = problem.table.full[name][0]
        rows.append({"layer": name, "members": [name], "units": units, "kept": units, "int8": [name],
                     "predicted": problem.int8_scores[name], "label": widths.get(name, "int8")})
    for name in sorted(set(widths) - covered - int8):
        outputs = problem.table.full[name][0] if name in problem.table.full else None
        rows.append({"layer": name, "members": [name], "units": outputs, "kept": outputs, "int8": [],
                     "predicted": None, "label": widths[name]})
    return rows


def stored_bits(model: nn.Module, rows: list[dict[str, Any]]) -> None:
    """Each row's ``bits``: the width its layer's codes are carried at on the delivered ``model`` (float: none)."""
    record = carried(model)
    codes = {} if record is None else record.codes
    for row in rows:
        found = codes.get(f"{row['layer']}.weight")
        row["bits"] = FLOAT_BITS if found is None else found.spec.bits


def budget_text(budget: Budget, caps: tuple[int | None, int | None]) -> str:
    """``budget`` as the refusals name it: each fraction given, and the caps it comes to."""
    text = f"latency={budget.latency!r}"
    if caps[0] is not None:
        text += f", size={budget.size!r} ({caps[0]} bytes)"
    if caps[1] is not None:
        text += f", macs={budget.macs!r} ({caps[1]} per example)"
    return text
