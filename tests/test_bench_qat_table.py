"""``benchmarks/qat_table.py``: the README's QAT table from small fake ``bench_qat.py`` JSON dicts (no runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import `_timing` this way
import qat_table

MACHINE = {"cpu": "Fake CPU 9000", "cpu_capability": "AVX512", "date": "2026-01-02T03:04:05"}
SETTINGS = {"epochs": 6, "start": 0.5, "scale_lr": None, "threads": 1}


def fake(qat: dict[str, list[float]], pruned_qat: list[float] | None = None) -> dict[str, Any]:
    """fp32 97.0 / 98.0 over two seeds; PTQ rows 90.0; QAT as given per config; pruned rows if given."""
    rows: list[dict[str, Any]] = [{"seed": s, "arm": "fp32", "config": "fp32", "acc": a}
                                  for s, a in enumerate((97.0, 98.0))]
    for config, accs in qat.items():
        for seed, acc in enumerate(accs):
            rows += [{"seed": seed, "arm": arm, "config": config, "acc": 90.0} for arm in ("PTQ RTN+MSE", "PTQ GPTQ")]
            rows.append({"seed": seed, "arm": "QAT", "config": config, "acc": acc, "epoch_cost_ratio": 1.1 + seed,
                         "load_average": 3.0 + seed})
    for seed, acc in enumerate(pruned_qat or []):
        rows += [{"seed": seed, "arm": "prune80+PTQ", "config": "int4", "acc": 96.0, "sparsity": 0.8},
                 {"seed": seed, "arm": "prune80+QAT", "config": "int4", "acc": acc, "sparsity": 0.8}]
    return {"machine": MACHINE, "settings": SETTINGS, "rows": rows}


def row(block: str, start: str) -> list[str]:
    line = next(line for line in block.splitlines() if line.startswith(f"| {start}"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.parametrize(("model", "config", "passing", "failing"), [
    ("SmallCNN", "int3", [96.5, 96.5], [96.4, 96.5]),  # float mean 97.5: int3 at most 1 point under
    ("ResNet-18-style", "int2", [94.5, 94.5], [94.4, 94.5]),  # int2 at most 3 points under
])
def test_cnn_verdict_flips_at_the_target(model: str, config: str, passing: list, failing: list) -> None:
    assert row(qat_table.build({model: fake({config: passing})}), f"{model}, {config}")[7] == "PASS"
    assert row(qat_table.build({model: fake({config: failing})}), f"{model}, {config}")[7] == "**FAIL**"


def test_pruned_verdict_flips_against_the_dense_float() -> None:
    assert row(qat_table.build({"SmallCNN": fake({"int4": [97, 98]}, [96.5, 96.5])}), "SmallCNN, pruned")[7] == "PASS"
    assert row(qat_table.build({"SmallCNN": fake({"int4": [97, 98]}, [96.4, 96.5])}),
               "SmallCNN, pruned")[7] == "**FAIL**"


def test_rows_without_a_target_are_info_and_hold_the_numbers() -> None:
    block = qat_table.build({"BERT-style": fake({"int3": [96.0, 97.0]})})  # the transformer: no target
    cells = row(block, "BERT-style, int3")
    assert cells[1:5] == ["97.50 ± 0.71 (97.00-98.00)", "90.00 ± 0.00 (90.00-90.00)", "90.00 ± 0.00 (90.00-90.00)",
                          "96.50 ± 0.71 (96.00-97.00)"]
    assert cells[5:] == ["+1.00 / +7.50 / +7.50", "–", "info", "1.10-2.10x"]
    assert "load average 3.0-4.0" in block and "seeds 0, 1" in block
    assert "SmallCNN: not measured" in block


def test_readme_block_is_replaced_and_a_readme_without_markers_is_refused() -> None:
    text = f"a\n{qat_table.START}\nold\n{qat_table.END}\nb\n"
    once = qat_table.update_readme(text, "new")
    assert once == f"a\n{qat_table.START}\nnew\n{qat_table.END}\nb\n"
    assert qat_table.update_readme(once, "new") == once
    with pytest.raises(ValueError, match="qat:start"):
        qat_table.update_readme("no markers", "new")


def test_pruned_rows_run_apart_join_the_main_run(tmp_path: Path) -> None:
    main, pruned = fake({"int4": [97.0, 98.0]}), fake({}, [96.4, 96.5])
    pruned["rows"] = [r for r in pruned["rows"] if r["arm"].startswith("prune80")]  # --pruned-only: no fp32 rows
    (tmp_path / "qat.json").write_text(json.dumps(main))
    assert qat_table.load(tmp_path, ("qat.json", "qat_pruned.json"))["files"] == ["qat.json"]  # none run apart
    (tmp_path / "qat_pruned.json").write_text(json.dumps(pruned))
    d = qat_table.load(tmp_path, ("qat.json", "qat_pruned.json"))
    block = qat_table.build({"SmallCNN": d})
    assert row(block, "SmallCNN, pruned")[7] == "**FAIL**"  # 1.05 under the main run's float mean 97.5
    assert "`results/qat.json` + `results/qat_pruned.json`" in block
    assert qat_table.load(tmp_path, ("missing.json", "qat_pruned.json")) is None
