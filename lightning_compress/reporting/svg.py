"""The report's figure as a dependency-free SVG: the same two panels as the matplotlib figure
(:func:`lightning_compress.reporting.render.build_figure`), written with string formatting only.

Why: drawing the PNG with matplotlib (its import on the first fit, then layout and rasterization on every fit)
was most of what the end-of-fit report cost, a fixed cost paid by every fit whether or not anyone looks at the
figure. An SVG of a few dozen shapes costs next to nothing, needs no optional dependency and opens in any browser
(and in the Markdown report). Top: the metric immediately before (hollow) and after (filled) every compression step,
the quantization's float -> quantized, the delivered model's metric (dashed), the pruned fraction (right axis).
Middle: per-layer bytes, fp32 vs compressed, labelled with storage bits and pruned fraction. Below them, when the
fit planned to a budget (:mod:`.budget_frontier`): every plan its verification measured, metric against file bytes,
with the budget, the frontier through them and the delivered model. No Lightning import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape

from lightning_compress.reporting.budget_frontier import budget_points
from lightning_compress.reporting.render import _fmt_bits, headline_parts

WIDTH, HEIGHT = 1000, 760
LEFT, RIGHT = 80, 920  # plot area, every panel
TOP_PANEL, BOTTOM_PANEL = (70, 370), (450, 650)  # (top y, bottom y)
FRONTIER_PANEL, FRONTIER_HEIGHT = (850, 1070), 1130  # only for a budget; below long rotated layer names
COLOURS = {"kept": "#1f77b4", "refused": "#d62728", "sparsity": "#ff7f0e", "fp32": "#7f7f7f",
           "compressed": "#9467bd", "quantized": "#2ca02c", "estimate": "#8c564b"}


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {extra}>'
            f"{escape(text)}</text>")


def _scale(low: float, high: float, start: float, end: float) -> Any:
    span = (high - low) or 1.0
    return lambda value: start + (value - low) / span * (end - start)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)] if high > low else [low]


def _axes(x_of: Any, y_of: Any, xs: Sequence[float], ys: Sequence[float], panel: tuple[int, int], x_fmt: str,
          y_fmt: str) -> list[str]:
    top, bottom = panel
    out = [f'<rect x="{LEFT}" y="{top}" width="{RIGHT - LEFT}" height="{bottom - top}" fill="none" stroke="#333"/>']
    out += [_text(x_of(x), bottom + 16, format(x, x_fmt), 10, "middle") for x in xs]
    out += [_text(LEFT - 6, y_of(y) + 4, format(y, y_fmt), 10, "end") for y in ys]
    out += [f'<line x1="{LEFT}" x2="{RIGHT}" y1="{y_of(y):.1f}" y2="{y_of(y):.1f}" stroke="#eee"/>' for y in ys]
    return out


def _steps_panel(summary: Mapping[str, Any]) -> list[str]:
    events = summary["events"]
    prune = [e for e in events if e["kind"] == "prune"]
    quant = [e for e in events if e["kind"] == "quantize" and e["metric_after"] is not None]
    delivered = summary["delivered"]["val"]
    values = [v for e in prune + quant for v in (e["metric_before"], e["metric_after"]) if v is not None]
    estimated = [e for e in prune if e["metric_after"] is None and e.get("metric_after_estimate")]
    values += [e["metric_after_estimate"][k] for e in estimated for k in ("low", "high")]
    values += [delivered] if delivered is not None else []
    steps = [e["step"] for e in prune + quant] or [0]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.08 or 0.01
    top, bottom = TOP_PANEL
    x_of = _scale(min(steps), max(steps), LEFT + 20, RIGHT - 20)
    y_of, s_of = _scale(low - pad, high + pad, bottom, top), _scale(0.0, 1.0, bottom, top)
    out = _axes(x_of, y_of, sorted(set(steps))[:: max(1, len(set(steps)) // 8)], _ticks(low - pad, high + pad),
                TOP_PANEL, "d", ".3f")
    out += [_text(RIGHT + 6, s_of(s) + 4, f"{s:.1f}", 10) for s in _ticks(0.0, 1.0, 6)]
    if prune:  # the pruned fraction as a step line (each level holds until the next event)
        points, level = [], 0.0
        for e in prune:
            points += [(x_of(e["step"]), s_of(level)), (x_of(e["step"]), s_of(e["sparsity"] or 0.0))]
            level = e["sparsity"] or 0.0
        points.append((RIGHT - 20, s_of(level)))
        out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}" fill="none" '
                   f'stroke="{COLOURS["sparsity"]}" stroke-opacity="0.6"/>')
    for e in prune:
        colour = COLOURS["kept" if e["accepted"] else "refused"]
        x = x_of(e["step"])
        if e["metric_before"] is not None and e["metric_after"] is not None:
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_of(e["metric_before"]):.1f}" '
                       f'y2="{y_of(e["metric_after"]):.1f}" stroke="{colour}" stroke-opacity="0.5"/>')
        for key, fill in (("metric_before", "white"), ("metric_after", colour)):
            if e[key] is not None:
                out.append(f'<circle cx="{x:.1f}" cy="{y_of(e[key]):.1f}" r="4" fill="{fill}" stroke="{colour}"/>')
    for e in estimated:  # an early stop's estimate: its interval, apart from the measured points
        x, v, colour = x_of(e["step"]), e["metric_after_estimate"], COLOURS["estimate"]
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_of(v["low"]):.1f}" y2="{y_of(v["high"]):.1f}" '
                   f'stroke="{colour}"/>')
        out.append(f'<circle cx="{x:.1f}" cy="{y_of(v["value"]):.1f}" r="3" fill="white" stroke="{colour}"/>')
    for e in quant:
        x, colour = x_of(e["step"]), COLOURS["quantized" if e["accepted"] else "refused"]
        if e["metric_before"] is not None:
            y = y_of(e["metric_before"])
            out.append(f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{COLOURS["fp32"]}"/>')
        y = y_of(e["metric_after"])
        out.append(f'<polygon points="{x:.1f},{y - 7:.1f} {x + 6:.1f},{y:.1f} {x:.1f},{y + 7:.1f} {x - 6:.1f},{y:.1f}" '
                   f'fill="{colour}"/>')
    if delivered is not None:
        out.append(f'<line x1="{LEFT}" x2="{RIGHT}" y1="{y_of(delivered):.1f}" y2="{y_of(delivered):.1f}" '
                   'stroke="black" stroke-dasharray="6,4"/>')
    name = summary["metric_name"] or "metric"
    kept, refused, sparsity = COLOURS["kept"], COLOURS["refused"], COLOURS["sparsity"]
    legend = [("white", kept, f"{name} before step"), (kept, kept, "pruning step kept"),
              (refused, refused, "rolled back"), (sparsity, sparsity, "pruned fraction (right axis)")]
    if estimated:
        legend.append(("white", COLOURS["estimate"], "after, estimated on part of the set (early stop)"))
    if quant:
        legend.append((COLOURS["quantized"], COLOURS["quantized"], f"quantized (grey: float {name})"))
    if delivered is not None:
        legend.append(("black", "black", f"delivered model {delivered:.4f} (dashed)"))
    for i, (fill, stroke, label) in enumerate(legend):
        y = top + 14 + 15 * i
        out += [f'<circle cx="{RIGHT - 250}" cy="{y - 4}" r="4" fill="{fill}" stroke="{stroke}"/>',
                _text(RIGHT - 240, y, label, 10)]
    out += [_text((LEFT + RIGHT) / 2, bottom + 34, "optimizer step", 11, "middle"),
            _text(20, (top + bottom) / 2, name, 11, "middle", f'transform="rotate(-90 20 {(top + bottom) / 2})"')]
    return out


def _layers_panel(summary: Mapping[str, Any]) -> list[str]:
    layers = summary["layers"]
    names = list(layers)
    top, bottom = BOTTOM_PANEL
    high = max([max(layers[n]["bytes_fp32"], layers[n]["bytes_compressed"]) for n in names] or [1])
    y_of = _scale(0.0, float(high) * 1.15, bottom, top)
    slot = (RIGHT - LEFT) / max(len(names), 1)
    out = _axes(lambda x: x, y_of, [], _ticks(0.0, float(high) * 1.15), BOTTOM_PANEL, "d", ",.0f")
    for i, layer_name in enumerate(names):
        layer, x = layers[layer_name], LEFT + slot * (i + 0.5)
        width = min(slot * 0.35, 40)
        for offset, key, colour in ((-width, "bytes_fp32", COLOURS["fp32"]), (0.0, "bytes_compressed",
                                                                               COLOURS["compressed"])):
            y = y_of(layer[key])
            out.append(f'<rect x="{x + offset:.1f}" y="{y:.1f}" width="{width:.1f}" height="{bottom - y:.1f}" '
                       f'fill="{colour}"/>')
        y = y_of(layer["bytes_compressed"])
        out += [_text(x + width / 2, y - 16, _fmt_bits(layer["bits"]), 9, "middle"),
                _text(x + width / 2, y - 5, f"{layer['sparsity']:.0%} pruned", 9, "middle"),
                _text(x, bottom + 14, layer_name, 10, "end", f'transform="rotate(-30 {x:.1f} {bottom + 14})"')]
    out += [_text((LEFT + RIGHT) / 2, top - 10, "per layer: bytes before (grey, fp32) and after (purple, compressed); "
                  "label: storage bits, pruned fraction", 12, "middle")]
    return out


def _frontier_panel(summary: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Metric against file bytes: each plan measured (within the bound: blue, outside: red), the frontier through
    them, the budget (dashed vertical) and the delivered model (green diamond)."""
    points, delivered, budget = found["points"], found["delivered"], found["budget"]
    xs = [p["bytes"] for p in points] + ([delivered["bytes"]] if delivered else []) + ([budget] if budget else [])
    ys = [p["metric"] for p in points] + ([delivered["metric"]] if delivered else [])
    top, bottom = FRONTIER_PANEL
    x_low, x_high = (min(xs), max(xs)) if xs else (0, 1)
    x_pad, (y_low, y_high) = (x_high - x_low) * 0.06 or 1.0, (min(ys), max(ys)) if ys else (0.0, 1.0)
    y_pad = (y_high - y_low) * 0.08 or 0.01
    x_of = _scale(x_low - x_pad, x_high + x_pad, LEFT, RIGHT)
    y_of = _scale(y_low - y_pad, y_high + y_pad, bottom, top)
    out = _axes(x_of, y_of, _ticks(x_low - x_pad, x_high + x_pad), _ticks(y_low - y_pad, y_high + y_pad),
                FRONTIER_PANEL, ",.0f", ".3f")
    if budget is not None:
        out.append(f'<line x1="{x_of(budget):.1f}" x2="{x_of(budget):.1f}" y1="{top}" y2="{bottom}" '
                   f'stroke="{COLOURS["refused"]}" stroke-dasharray="6,4"/>')
    line = " ".join(f"{x_of(p['bytes']):.1f},{y_of(p['metric']):.1f}" for p in found["frontier"])
    out.append(f'<polyline points="{line}" fill="none" stroke="{COLOURS["kept"]}" stroke-opacity="0.5"/>')
    for p in points:
        colour = COLOURS["kept" if p.get("accepted") else "refused"]
        out.append(f'<circle cx="{x_of(p["bytes"]):.1f}" cy="{y_of(p["metric"]):.1f}" r="4" fill="{colour}" '
                   f'stroke="{colour}"><title>{escape(str(p.get("what") or "plan"))}</title></circle>')
    if delivered is not None:
        x, y = x_of(delivered["bytes"]), y_of(delivered["metric"])
        out.append(f'<polygon points="{x:.1f},{y - 7:.1f} {x + 6:.1f},{y:.1f} {x:.1f},{y + 7:.1f} {x - 6:.1f},{y:.1f}" '
                   f'fill="{COLOURS["quantized"]}"/>')
    name = summary["metric_name"] or "metric"
    legend = [(COLOURS["kept"], "plan measured, met the bound (line: the frontier)"),
              (COLOURS["refused"], "plan measured, outside the bound; dashed: the budget"),
              (COLOURS["quantized"], "delivered model")]
    for i, (colour, label) in enumerate(legend):
        y = top + 14 + 15 * i
        out += [f'<circle cx="{RIGHT - 250}" cy="{y - 4}" r="4" fill="{colour}" stroke="{colour}"/>',
                _text(RIGHT - 240, y, label, 10)]
    out += [_text((LEFT + RIGHT) / 2, top - 10, f"budget: {name} against file bytes of every plan the verification "
                  "measured", 12, "middle"),
            _text((LEFT + RIGHT) / 2, bottom + 34, "file bytes", 11, "middle"),
            _text(20, (top + bottom) / 2, name, 11, "middle", f'transform="rotate(-90 20 {(top + bottom) / 2})"')]
    return out


def build_svg(summary: Mapping[str, Any]) -> str:
    """The figure of ``summary`` (:func:`lightning_compress.reporting.summary.summarize`) as an SVG document."""
    title = [_text(WIDTH / 2, 18 + 14 * i, line, 11, "middle") for i, line in enumerate(headline_parts(summary))]
    body = [*title, *_steps_panel(summary), *_layers_panel(summary)]
    found, height = budget_points(summary), HEIGHT
    if found is not None and found["points"]:
        body, height = body + _frontier_panel(summary, found), FRONTIER_HEIGHT
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} '
            f'{height}" font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
