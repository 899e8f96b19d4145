"""The plans a budget's verification measured, as points of metric against file size: what the report draws as the
size / metric frontier of an ``AdaptiveCompression`` fit, and its one line of text. No Lightning import.

Why: the verification is the budget's evidence. The plan chosen, its corrections, the uniform configurations it
was compared with and the larger budgets tried after a failed bound were each written and measured; seeing them
against the budget shows how close to the bound the delivered model is and what a little more size would buy.

Input: the summary's gate entry of the callback that planned to a budget (``"tried"``: one mapping per plan
measured, ``{"bytes", "metric", "what", "accepted"}``; ``"budget"`` / ``"delivered"``), and the delivered model's
metric. Points without a measured metric or file size (no ``metric_fn``, no size cap) cannot be placed and are
left out; the line says how many.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_compress.adaptive.frontier import frontier


def budget_points(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"points", "frontier", "budget", "delivered", "unplaced"}`` of the first gate entry holding measured
    plans, None when none does. ``frontier``: the points no smaller one matches (better is the metric's way)."""
    entry = next((e for e in summary.get("gate", {}).values() if isinstance(e, Mapping) and e.get("tried")), None)
    if entry is None:
        return None
    placed = [p for p in entry["tried"] if p.get("bytes") is not None and p.get("metric") is not None]
    sign = 1.0 if summary.get("higher_is_better", True) else -1.0  # frontier() wants higher-is-better
    best = frontier([{**p, "metric": sign * p["metric"], "point": p} for p in placed])
    delivered_bytes = (entry.get("delivered") or {}).get("file_bytes")
    metric = summary.get("metric_after")
    return {
        "points": placed,
        "frontier": [p["point"] for p in best],
        "budget": (entry.get("budget") or {}).get("bytes"),
        "delivered": None if delivered_bytes is None or metric is None else {"bytes": delivered_bytes,
                                                                            "metric": metric},
        "unplaced": len(entry["tried"]) - len(placed),
    }


def frontier_line(summary: Mapping[str, Any]) -> str | None:
    """One line for the text report: each plan measured (bytes -> metric, whether it met the bound), the budget,
    the delivered file; None when the run planned to no budget."""
    found = budget_points(summary)
    if found is None:
        return None
    shown = "; ".join(f"{p['bytes']:,} B -> {p['metric']:.4g} {p.get('what') or 'plan'}"
                      f"{'' if p.get('accepted') else ' (outside the bound)'}" for p in sorted(found["points"],
                                                                                      key=lambda p: p["bytes"]))
    count = len(found["points"])
    parts = [f"budget frontier: {count} plan{'s' if count != 1 else ''} measured (file bytes -> "
             f"{summary.get('metric_name') or 'metric'}): {shown or 'none placed'}"]
    if found["unplaced"]:
        parts.append(f"{found['unplaced']} without a measured metric or file size")
    if found["budget"] is not None:
        parts.append(f"budget {found['budget']:,} B")
    if found["delivered"] is not None:
        parts.append(f"delivered {found['delivered']['bytes']:,} B -> {found['delivered']['metric']:.4g}")
    return "; ".join(parts)
