"""``benchmarks/run_all.py``'s summary builder and README update, from small fake JSON dicts (no benchmark runs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import `_timing` this way
import run_all

MACHINE = {"cpu": "Fake CPU 9000", "cpu_count": 2, "torch": "2.13.0", "lightning": "2.6.6",
           "date": "2026-01-02T03:04:05"}


def _runs(method: str, level: float, accs: list[float]) -> list[dict[str, Any]]:
    return [{"method": method, "sparsity": level, "seed": i, "test_acc": a} for i, a in enumerate(accs)]


def fake_data() -> dict[str, dict[str, Any]]:
    stats = {
        "machine": {**MACHINE, "mode": "full"},
        "micro": [{"model": "SmallCNN 28x28", "mode": "unstructured (per_weight)", "adam_ms": 0.5, "stats_ms": 0.123,
                   "ratio": 0.25}],
        "fit": {"min_seconds": {"baseline": 10.0, "callback, evaluate=False": 10.5, "callback, evaluate=True": 12.0},
                "overhead": {"baseline": 0.0, "callback, evaluate=False": 0.05, "callback, evaluate=True": 0.2}},
    }
    runs = _runs("dense", 0.0, [97.0, 97.4])
    for level, ours, lightning in ((0.95, [96.8, 97.0], [97.0, 97.2]), (0.99, [95.0, 95.4], [91.0, 91.4])):
        runs += _runs("weighted_stability", level, ours) + _runs("ModelPruning", level, lightning)
    structured = {
        "machine": {**MACHINE, "mode": "full"}, "arch": {"channels": [32, 64], "hidden": 128}, "fraction": 0.5,
        "epochs": 4, "finetune": 2, "latency_threads": 1,
        "figures": {"parameters": {"dense": 420000, "compacted": 105000},
                    "MACs / image": {"dense": 6_000_000, "compacted": 1_500_000},
                    "latency batch 1 (ms)": {"dense": 0.4, "compacted": 0.2},
                    "latency batch 64 (ms)": {"dense": 9.0, "compacted": 4.5},
                    "test accuracy (%)": {"dense": 97.6, "compacted": 97.0}},
    }
    quantization = {
        "machine": {**MACHINE, "mode": "full"},
        "mlp": [{"scheme": "fp32", "kernels": "float", "acc": 97.5, "bytes": 18_400_000, "latency_ms": 2.0},
                {"scheme": "int8 per-channel", "kernels": "Int8Linear (_int_mm)", "acc": 97.4, "bytes": 4_600_000,
                 "latency_ms": 1.25}],
        "quantize_time": {"params": 22_000_000, "int8_minmax_s": 0.31, "int4_g128_mse_s": 2.5},
        "transformer": {"fp32_acc": 96.1, "schemes": [
            {"scheme": "int8 per-channel RTN", "acc": 96.0}, {"scheme": "int4 per-channel RTN", "acc": 94.2},
            {"scheme": "int4 g32 MSE", "acc": 95.7}, {"scheme": "int2 g32 MSE asym", "acc": 41.3}]},
    }
    serving = {
        "machine": {**MACHINE, "mode": "full", "cpu_capability": "AVX2", "onnxruntime": "1.32.0"}, "threads": 1,
        "checks": [
            {"check": "MLP ORT int8 vs ORT fp32, batch 64", "value": "1.93x", "target": ">= 1.8x", "pass": True},
        ],
    }
    minilm = {
        "machine": {**MACHINE, "mode": "full", "cpu_capability": "AVX2"}, "sentences": 62, "calibration_texts": 161,
        "schemes": [{"scheme": "GPTQ int4 g128", "min_cos": 0.96, "mean_cos": 0.98, "nn_agreement": 0.98,
                     "file_ratio": 0.135, "seconds": 15.0, "verdict": "**FAIL**"}],
        "int8_activations": [{"scheme": "SmoothQuant", "min_cos": 0.998}],
    }
    gptq_models = {
        "machine": {**MACHINE, "mode": "full", "cpu_capability": "AVX2"},
        "models": {"ResNet18 w16": {"fp32_acc": 98.0, "calibration_images": 1024}},
        "rows": [{"model": "ResNet18 w16", "scheme": "int3 g32 RTN", "method": "rtn", "acc": 96.5, "drop": 1.5,
                  "logit_rel_err": 0.164, "file_ratio": 0.157, "seconds": 0.2, "float_kept_share": 0.021},
                 {"model": "ResNet18 w16", "scheme": "int3 g32 GPTQ", "method": "gptq", "acc": 97.5, "drop": 0.5,
                  "logit_rel_err": 0.037, "file_ratio": 0.157, "seconds": 5.0, "float_kept_share": 0.021}],
        "gptq_below_rtn": [], "gptq_logit_err_above_rtn": [],
    }
    return {"stats_overhead": stats, "sparsity": {"runs": runs, "machine": {**MACHINE, "mode": "full"}},
            "structured": structured, "quantization": quantization, "serving": serving, "minilm": minilm,
            "gptq_models": gptq_models}


def summary(data: dict[str, Any]) -> str:
    return run_all.build_summary(data, machine=MACHINE)


def row(text: str, figure: str) -> list[str]:
    """The cells of the table row whose first cell starts with ``figure``."""
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {figure}")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_tables_hold_the_given_numbers() -> None:
    text = summary(fake_data())
    assert "Fake CPU 9000, 2 cores (CPU capability AVX2), torch 2.13.0, lightning 2.6.6, 2026-01-02" in text
    assert "All figures come from one run of `make bench`" in text
    assert row(text, "statistics update, SmallCNN")[1:] == ["0.123 ms", "Adam step 0.500 ms", "0.25×", "≤ 0.3×", "PASS"]
    assert row(text, "`Trainer.fit`, callback, evaluate=False")[1:4] == ["10.50 s wall", "no callback 10.00 s",
                                                                              "+5.0 % CPU"]
    assert row(text, "test accuracy at 95 %")[1:4] == ["96.90 ± 0.14 %", "dense 97.20 ± 0.28 %", "-0.30 pt"]
    assert row(text, "test accuracy at 99 %")[1:4] == ["95.20 ± 0.28 %", "ModelPruning 91.20 ± 0.28 %", "+4.00 pt"]
    assert row(text, "latency, batch 64")[1:4] == ["4.500 ms", "dense 9.000 ms", "2.00× faster"]
    assert row(text, "parameters")[1:4] == ["105,000", "dense 420,000", "4.00× fewer"]
    assert row(text, "int8 per-channel")[2:] == ["97.40 (+0.10)", "4.60 (0.250×)", "1.250 (1.60×)"]
    assert row(text, "int4") == ["int4", "94.20", "95.70"] and row(text, "int2") == ["int2", "–", "41.30"]
    assert "int8 per-channel 0.31 s" in text and "22.0M-parameter" in text
    assert row(text, "ResNet18 w16")[1:] == ["int3 g32 (2.1 % float)", "96.50 (-1.50)", "97.50 (-0.50)",
                                             "0.164 / 0.037", "0.157×", "0.20 / 5.0"]


@pytest.mark.parametrize(
    ("figure", "path", "passing", "failing"),
    [
        ("statistics update", ("stats_overhead", "micro", 0, "ratio"), 0.29, 0.31),
        ("`Trainer.fit`, callback, evaluate=False", ("stats_overhead", "fit", "overhead", "callback, evaluate=False"),
         0.09, 0.11),
        ("latency, batch 64", ("structured", "figures", "latency batch 64 (ms)", "compacted"), 9.0 / 1.8, 9.0 / 1.6),
        ("test accuracy after fine-tuning", ("structured", "figures", "test accuracy (%)", "compacted"), 96.2, 96.0),
    ],
)
def test_verdict_flips_at_the_target(figure: str, path: tuple, passing: float, failing: float) -> None:
    verdicts = []
    for value in (passing, failing):
        data = fake_data()
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        verdicts.append(row(summary(data), figure)[-1])
    assert verdicts == ["PASS", "**FAIL**"]


@pytest.mark.parametrize(
    ("figure", "method", "level", "passing", "failing"),
    [
        ("test accuracy at 95 %", "weighted_stability", 0.95, [96.3, 96.3], [96.1, 96.1]),  # dense mean 97.2, -1 pt
        ("test accuracy at 99 %", "weighted_stability", 0.99, [94.3, 94.3], [94.1, 94.1]),  # ModelPruning 91.2, +3
        ("levels below ModelPruning", "weighted_stability", 0.95, [97.0, 97.0], [96.9, 96.9]),  # vs 97.1 - 0.14 = 96.96
    ],
)
def test_sparsity_verdicts_flip(figure: str, method: str, level: float, passing: list, failing: list) -> None:
    verdicts = []
    for accs in (passing, failing):
        data = fake_data()
        runs = [r for r in data["sparsity"]["runs"] if (r["method"], r["sparsity"]) != (method, level)]
        data["sparsity"]["runs"] = runs + _runs(method, level, accs)
        verdicts.append(row(summary(data), figure)[-1])
    assert verdicts == ["PASS", "**FAIL**"]


def test_missing_benchmark_and_partial_rerun() -> None:
    data: dict[str, Any] = fake_data()
    data["structured"] = None
    text = run_all.build_summary(data, ran=["quantization"], machine=MACHINE)
    assert "Not measured yet: `python benchmarks/run_all.py --only structured`" in text
    assert "; quantization re-run since" in text


README = "# Project\n\nIntro.\n\n## Usage\n\nRun it.\n\n## License\n\nApache-2.0\n"


def test_readme_section_is_added_once_and_replacement_is_idempotent() -> None:
    block = summary(fake_data())
    first = run_all.update_readme(README, block)
    assert first.index("## Benchmark results") < first.index("## License")
    assert first.startswith("# Project\n\nIntro.\n\n## Usage\n\nRun it.\n\n")
    assert first.endswith("## License\n\nApache-2.0\n")
    assert run_all.update_readme(first, block) == first
    other = summary({**fake_data(), "quantization": None})
    second = run_all.update_readme(first, other)
    assert second.count(run_all.START) == 1 and second.count("## Benchmark results") == 1
    assert "Not measured yet" in second and "Not measured yet" not in first
    before, after = first.split(run_all.START)[0], first.split(run_all.END)[1]
    assert second.split(run_all.START)[0] == before and second.split(run_all.END)[1] == after
    assert run_all.update_readme(second, block) == first


def test_readme_without_license_gets_the_section_at_the_end() -> None:
    text = run_all.update_readme("# P\n\nIntro.\n", "table")
    assert text.startswith("# P\n\nIntro.\n\n## Benchmark results")
    assert text.endswith(f"{run_all.START}\ntable\n{run_all.END}\n")


def test_commands(tmp_path: Path) -> None:
    quick = run_all.command("structured", True, tmp_path)
    script = str(run_all.HERE / "bench_structured.py")
    assert quick[1:] == [script, "--quick", "--json", str(tmp_path / "structured.json")]
    assert run_all.command("sparsity", False, tmp_path)[2:] == ["--out", str(tmp_path / "sparsity.md")]



def test_sections_measured_hours_apart_are_not_called_one_run() -> None:
    data: dict[str, Any] = fake_data()
    data["minilm"] = {**data["minilm"], "machine": {**data["minilm"]["machine"], "date": "2026-01-02T06:00:00"}}
    data["sparsity"] = {**data["sparsity"], "machine": {**data["sparsity"]["machine"], "date": "2026-01-02T01:00:00"}}
    text = run_all.build_summary(data, machine=MACHINE)
    assert "All figures come from one run" not in text
    assert "2026-01-02 01:00 to 2026-01-02 06:00: each date is under its title" in text


def _transformer_rows() -> dict[str, dict[str, Any]]:
    """bench_serving_transformer's rows, shaped as it writes them; every target met with some margin."""
    def r(acc: float, mb: float, ms: float) -> dict[str, Any]:
        return {"acc": acc, "bytes": int(mb * 1e6), "x_fp32_bytes": mb / 90.0, "ms b32x128 t1": ms,
                "ms b1x128 t1": ms / 20}

    return {"ORT fp32": r(90.0, 90.0, 100.0), "ORT quantize_dynamic": r(89.5, 23.0, 60.0),
            "ours int8": r(89.8, 22.9, 55.0), "ours structured + int8": r(89.2, 15.0, 45.0),
            "ours int4": r(89.0, 13.5, 80.0)}


@pytest.mark.parametrize(
    ("check", "row", "key", "failing"),
    [
        ("ours int8 vs ORT quantize_dynamic, b32x128 t1", "ours int8", "ms b32x128 t1", 57.5),  # > 0.95 x 60
        ("ours int8 file vs ORT quantize_dynamic's", "ours int8", "bytes", 23_000_001),
        ("ours structured + int8 vs ORT fp32, b1x128 t1", "ours structured + int8", "ms b1x128 t1", 2.6),  # > 0.5x5
        ("ours structured + int8 accuracy drop vs ORT fp32", "ours structured + int8", "acc", 88.9),  # 1.1 pt
        ("ours int4 file vs ORT fp32", "ours int4", "x_fp32_bytes", 0.161),
    ],
)
def test_serving_transformer_verdicts_flip_at_the_target(check: str, row: str, key: str, failing: float) -> None:
    from bench_serving_transformer import verdicts

    rows = _transformer_rows()
    passing = {c["check"]: c["pass"] for c in verdicts(rows)}
    assert all(passing.values()) and check in passing and len(passing) == 7
    rows[row][key] = failing
    failed = {c["check"] for c in verdicts(rows) if not c["pass"]}
    assert failed == {check}
