"""``callbacks/adaptive_plan.py`` under DDP: the Fisher and GPTQ run on rank zero alone and every rank takes them
(:func:`~lightning_compress.callbacks.adaptive_plan.on_rank_zero`), with a rank stood in, then 2 real processes."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_compress.callbacks.adaptive_plan import on_rank_zero
from lightning_compress.quantization.primitives import QuantSpec, quantize_tensor


def _trainer(rank: int, world: int, rank_zeros: Any) -> Any:
    """A stand-in trainer whose broadcast gives what rank zero sent (``rank_zeros``: what it sends, when this rank is
    not rank zero)."""
    sent: list[Any] = []

    def broadcast(obj: Any, src: int = 0) -> Any:
        sent.append(obj)
        return obj if rank == 0 else rank_zeros

    strategy = types.SimpleNamespace(broadcast=broadcast)
    return types.SimpleNamespace(world_size=world, is_global_zero=rank == 0, strategy=strategy, sent=sent)


def _codes() -> dict[str, Any]:
    return {"fc": quantize_tensor(torch.randn(4, 8), QuantSpec(4, "per_channel", 128, True, "minmax"))}


def test_one_process_runs_the_work_and_broadcasts_nothing() -> None:
    trainer, calls = _trainer(0, 1, None), []
    assert on_rank_zero(trainer, torch.device("cpu"))(lambda: calls.append(1) or 5) == 5
    assert calls == [1] and trainer.sent == []


def test_rank_zero_runs_the_work_and_sends_its_codes_on_cpu() -> None:
    codes = _codes()
    trainer = _trainer(0, 2, None)
    got = on_rank_zero(trainer, torch.device("cpu"))(lambda: (codes, {"left": "why"}))
    (sent, failure), = trainer.sent
    assert failure is None and sent[1] == {"left": "why"}
    assert torch.equal(sent[0]["fc"].q, codes["fc"].q) and sent[0]["fc"].q.device.type == "cpu"
    assert torch.equal(got[0]["fc"].dequantize(), codes["fc"].dequantize())


def test_another_rank_runs_no_work_and_takes_rank_zeros_codes() -> None:
    codes = _codes()
    trainer = _trainer(1, 2, ((codes, {}), None))

    def work() -> Any:
        raise AssertionError("rank 1 must not run GPTQ")

    got, left = on_rank_zero(trainer, torch.device("cpu"))(work)
    assert left == {} and torch.equal(got["fc"].q, codes["fc"].q) and torch.equal(got["fc"].scale, codes["fc"].scale)
    assert got["fc"].spec == codes["fc"].spec


# id, rank, what rank zero sends (for rank 1), the error expected and its message
FAILURES = [
    ("rank_zero_raises_its_own", 0, None, ValueError, "Hessian holds NaN"),
    ("rank_one_raises_quoting_rank_zero", 1, (None, "ValueError: layer 'fc': its input Hessian holds NaN"),
     RuntimeError, "failed there: ValueError: layer 'fc'"),
]


@pytest.mark.parametrize(("rank", "rank_zeros", "error", "match"), [f[1:] for f in FAILURES],
                         ids=[f[0] for f in FAILURES])
def test_a_failure_on_rank_zero_raises_on_every_rank(rank: int, rank_zeros: Any, error: type[Exception],
                                                     match: str) -> None:
    trainer = _trainer(rank, 2, rank_zeros)

    def work() -> Any:
        if rank != 0:
            raise AssertionError("rank 1 must not run GPTQ")
        raise ValueError("layer 'fc': its input Hessian holds NaN / inf")

    with pytest.raises(error, match=match):
        on_rank_zero(trainer, torch.device("cpu"))(work)
    assert len(trainer.sent) == 1  # rank zero still sent (its failure): no rank is left waiting


@pytest.mark.ddp
def test_ddp_the_fisher_and_gptq_run_on_rank_zero_alone_and_both_ranks_hold_the_same_codes(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """strategy='ddp', 2 CPU ranks (gloo), ``method="gptq"``: right after ``compress()`` (before the callback hands
    every rank rank zero's model), rank 1 has run neither the Fisher's backward passes nor GPTQ, and both ranks
    hold bit-identical codes and weights and took the same steps."""
    from tests.callbacks.test_ddp import _run_script
    from tests.ddp import adaptive_gptq_scenarios

    monkeypatch.setattr("tests.callbacks.test_ddp.HELPERS", Path(adaptive_gptq_scenarios.__file__).resolve())
    _run_script("gptq", tmp_path)
    ranks = [json.loads((tmp_path / f"gptq.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["gptq_model_calls"] == 1 and ranks[1]["gptq_model_calls"] == 0
    assert ranks[0]["diagonal_fisher_calls"] == 1 and ranks[1]["diagonal_fisher_calls"] == 0
    assert ranks[0]["codes"] is not None and ranks[0]["method"] == "gptq"  # GPTQ kept: its codes are compared
    for key in ("codes", "scales", "weights", "method", "plan", "steps"):
        assert ranks[0][key] == ranks[1][key], key
