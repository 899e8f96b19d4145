"""The budget's verification in the report: every plan measured as a point of metric against file bytes in the
SVG (with the budget, the frontier and the delivered model) and one line in the console and Markdown reports."""

from __future__ import annotations

import io
from typing import Any
from xml.etree import ElementTree

import pytest
from rich.console import Console

from lightning_compress.reporting import render
from lightning_compress.reporting.budget_frontier import budget_points, frontier_line
from lightning_compress.reporting.summary import summarize
from lightning_compress.reporting.svg import FRONTIER_HEIGHT, HEIGHT, build_svg
from tests.reporting._fixtures import _model, _report

SVG = "{http://www.w3.org/2000/svg}"
TRIED = [  # as the verification records them: the plan, a uniform rival, a corrected plan, one with no metric
    {"bytes": 9_800, "metric": 0.90, "what": "plan", "accepted": False},
    {"bytes": 9_500, "metric": 0.92, "what": "uniform int4 per-channel", "accepted": True},
    {"bytes": 9_900, "metric": 0.93, "what": "plan (corrected)", "accepted": True},
    {"bytes": 9_700, "metric": None, "what": "plan", "accepted": False},
]


def _summary(tried: list[dict[str, Any]] | None, higher_is_better: bool = True) -> dict[str, Any]:
    model = _model()
    report = _report(model)
    report.higher_is_better = higher_is_better
    if tried is not None:
        report.gate["adaptive"] = {"tried": tried, "budget": {"bytes": 10_000},
                                   "delivered": {"file_bytes": 9_880}}
    return summarize(report, model)


def test_the_points_are_the_plans_measured_and_the_frontier_the_ones_no_smaller_plan_beats() -> None:
    found = budget_points(_summary(TRIED))
    assert found is not None
    assert [p["bytes"] for p in found["points"]] == [9_800, 9_500, 9_900]  # the one with no metric is not placed
    assert found["unplaced"] == 1
    assert [p["bytes"] for p in found["frontier"]] == [9_500, 9_900]  # 9,800 B measured worse than 9,500 B
    assert found["budget"] == 10_000
    assert found["delivered"] == {"bytes": 9_880, "metric": 0.94}  # the fixture's metric after


def test_a_lower_is_better_metric_has_its_frontier_the_other_way() -> None:
    found = budget_points(_summary(TRIED, higher_is_better=False))
    assert found is not None
    assert [p["bytes"] for p in found["frontier"]] == [9_500, 9_800]  # 0.90 at 9,800 B is the better loss


def test_a_run_without_a_budget_has_no_points_no_line_and_the_figure_its_usual_height() -> None:
    summary = _summary(None)
    assert budget_points(summary) is None and frontier_line(summary) is None
    root = ElementTree.fromstring(build_svg(summary))
    assert root.get("height") == str(HEIGHT)
    assert not any("every plan the verification measured" in (t.text or "") for t in root.iter(f"{SVG}text"))


def test_the_svg_draws_every_placed_plan_the_budget_and_the_delivered_model() -> None:
    plain = ElementTree.fromstring(build_svg(_summary(None)))
    root = ElementTree.fromstring(build_svg(_summary(TRIED)))
    assert root.get("height") == str(FRONTIER_HEIGHT)
    titled = [c for c in root.iter(f"{SVG}circle") if c.find(f"{SVG}title") is not None]
    assert sorted(c.find(f"{SVG}title").text for c in titled) == sorted(p["what"] for p in TRIED[:3])
    within = [c for c in titled if c.get("fill") == "#1f77b4"]
    assert len(within) == 2  # the two plans within the bound, the other red
    xs = {c.find(f"{SVG}title").text: float(c.get("cx")) for c in titled}
    assert xs["uniform int4 per-channel"] < xs["plan"] < xs["plan (corrected)"]  # placed by their file bytes
    dashed = [line for line in root.iter(f"{SVG}line") if line.get("stroke-dasharray") and
              line.get("x1") == line.get("x2")]
    assert len(dashed) == 1 and float(dashed[0].get("x1")) > xs["plan (corrected)"]  # the budget, right of them all
    diamonds = len(list(root.iter(f"{SVG}polygon"))) - len(list(plain.iter(f"{SVG}polygon")))
    assert diamonds == 1  # the delivered model


@pytest.mark.parametrize("where", ["markdown", "console"])
def test_the_text_report_has_one_line_with_each_plan_the_budget_and_the_delivered_file(where: str) -> None:
    summary = _summary(TRIED)
    if where == "markdown":
        text = render.to_markdown(summary)
    else:
        buffer = io.StringIO()
        Console(file=buffer, width=1000, color_system=None).print(render.render_console(summary))
        text = buffer.getvalue()
    lines = [line for line in text.splitlines() if "budget frontier" in line]
    assert len(lines) == 1
    for expected in ("3 plans measured", "9,500 B -> 0.92 uniform int4 per-channel", "9,800 B -> 0.9 plan (outside "
                     "the bound)", "1 without a measured metric", "budget 10,000 B", "delivered 9,880 B -> 0.94"):
        assert expected in lines[0], expected


def test_one_plan_is_one_plan() -> None:
    line = frontier_line(_summary(TRIED[2:3]))
    assert line is not None and "budget frontier: 1 plan measured " in line
