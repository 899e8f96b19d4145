"""Within a metric bound: which layers go back to more bits (or float) when the fully quantized model breaks it.
Pure: the caller gives how to put the model in a state and how to measure it; no Lightning import.

1. Each layer's *sensitivity* is measured: the metric drop with only that layer quantized.
2. The most sensitive layers (ties: lower SQNR first) climb the rungs one at a time (e.g. int4 -> int6 -> int8 ->
   float), re-measuring after each, until the gate (:mod:`lightning_compress.core.gate`) passes. Given each
   layer's ``size`` (its weight count: what a promotion adds to the file), the order is sensitivity *per weight*:
   the bound is bought with the fewest extra bytes (a greedy knapsack). Measured on all-MiniLM-L6-v2, int4 g128
   GPTQ bounded at 0.015 cosine on held-out sentences: ordered by sensitivity alone, the 11.7 M-weight word
   embedding went to 6 bits third and the file grew from 0.135x to 0.178x fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.core.gate import MetricGate

FALLBACKS = ("float", "more_bits")


def rungs(bits: int, fallback: str) -> list[int]:
    """The bit widths a layer falls back to, in order: float only, or every even width above ``bits`` up to 8,
    then float."""
    if fallback == "float":
        return [FLOAT_BITS]
    return [b for b in (4, 6, 8) if b > bits] + [FLOAT_BITS]


def label(bits: int) -> str:
    return "float" if bits >= FLOAT_BITS else f"int{bits}"


def fall_back(
    names: Sequence[str],
    plan: dict[str, int],
    apply: Callable[[dict[str, int]], None],
    evaluate: Callable[[], float],
    sqnr_db: Callable[[str, int], float],
    gate: MetricGate,
    reference: float,
    ladder: Sequence[int],
    size: Callable[[str], int] | None = None,
) -> tuple[float | None, list[dict[str, Any]], dict[str, float]]:
    """Promote layers of ``plan`` (changed in place) until ``gate`` passes against ``reference``. Returns the
    metric after the last change, the fallbacks taken and the per-layer sensitivities."""
    sensitivity: dict[str, float] = {}
    for name in names:
        apply({n: plan[name] if n == name else FLOAT_BITS for n in names})
        drop = gate.drop(reference, evaluate())
        sensitivity[name] = float("inf") if drop is None or drop != drop else drop
    weights = {n: max(1, size(n)) if size is not None else 1 for n in names}
    order = sorted(names, key=lambda n: (-sensitivity[n] / weights[n], sqnr_db(n, plan[n]), n))
    taken: list[dict[str, Any]] = []
    after: float | None = None
    for rung in ladder:
        for name in order:
            if plan[name] >= rung:
                continue
            old, plan[name] = plan[name], rung
            apply(plan)
            after = evaluate()
            taken.append({
                "layer": name, "from_bits": old, "to_bits": rung, "kept": label(rung),
                "sensitivity": sensitivity[name], "sqnr_db": sqnr_db(name, old), "metric_after": after,
                "reason": f"most sensitive remaining layer{' per weight' if size is not None else ''} (metric drop "
                          f"{sensitivity[name]:.4g} when quantized alone, {weights[name]} weights)",
            })
            if gate.judge(reference, after).accepted:
                return after, taken, sensitivity
    return after, taken, sensitivity
