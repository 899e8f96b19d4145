"""AdaptiveCompression's end-of-fit GPTQ (``method``) in real ``Trainer.fit`` runs on scikit-learn's digits: the
same fit with ``method="rtn"`` and ``"gptq"``, side by side; a bad ``method`` refused in the constructor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning_compress import AdaptiveCompression, Budget, load_quantized
from lightning_compress.demos.data import DigitsDataModule
from tests.callbacks.test_adaptive import _model, _test_accuracy, _trainer

BUDGET = Budget(size=0.17)  # tight for the digits MLP: 2-3 bits per weight, where rounding matters


def _fit(root: Path, method: str) -> AdaptiveCompression:
    pl.seed_everything(0)
    callback = AdaptiveCompression(budget=BUDGET, max_metric_drop=0.5, export_path="model.safetensors",
                                   method=method)  # type: ignore[arg-type]
    _trainer([callback], root).fit(_model(), DigitsDataModule(batch_size=64))
    return callback


def test_gptq_at_the_end_of_the_fit_is_kept_only_where_measured_no_worse(tmp_path: Path) -> None:
    rtn, gptq = _fit(tmp_path / "rtn", "rtn"), _fit(tmp_path / "gptq", "gptq")
    assert rtn.result is not None and gptq.result is not None
    assert rtn.result.method == "rtn" and not any("gptq" in step for step in rtn.result.steps)
    assert "gptq on" in gptq.result.steps[-1]  # tried, measured, and the outcome said
    assert gptq.result.method == "gptq", gptq.result.steps[-1]  # at this budget GPTQ measured better, so kept
    assert [r["label"] for r in gptq.result.plan] == [r["label"] for r in rtn.result.plan]  # the same widths
    assert gptq.report.gate["adaptive"]["quantization"] == "GPTQ at the widths planned"
    assert rtn.report.gate["adaptive"]["quantization"] == "round to nearest with the calibration's clipping search"
    for callback in (rtn, gptq):
        export = Path(callback.report.files["quantized"])
        assert export.stat().st_size == callback.result.file_bytes <= callback.result.budget_bytes  # type: ignore
    assert gptq.result.metric_after is not None and rtn.result.metric_after is not None
    assert gptq.result.metric_after >= rtn.result.metric_after  # validation: GPTQ replaced RTN only if no worse
    delivered = {m: load_quantized(_model(), c.report.files["quantized"]) for m, c in (("rtn", rtn), ("gptq", gptq))}
    print(f"digits MLP at {BUDGET!r}: validation {rtn.result.metric_after:.4f} (rtn) vs "
          f"{gptq.result.metric_after:.4f} ({gptq.result.method}); test {_test_accuracy(delivered['rtn']):.4f} vs "
          f"{_test_accuracy(delivered['gptq']):.4f}")


BAD: list[tuple[str, dict[str, Any], type[Exception], tuple[str, ...]]] = [
    ("method_unknown", {"method": "awq"}, ValueError, ("method", "'awq'", "gptq", "rtn")),
    ("method_none", {"method": None}, ValueError, ("method", "None")),
]


@pytest.mark.parametrize(("kwargs", "error", "texts"), [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_the_constructor_refuses_a_bad_method(kwargs: dict[str, Any], error: Any, texts: tuple[str, ...]) -> None:
    with pytest.raises(error) as info:
        AdaptiveCompression(budget=BUDGET, **kwargs)
    for text in texts:
        assert text in str(info.value), (text, str(info.value))
