"""Session.deliver: the model holds the plan it returns, also when a later header round chose a plan over the cap
and the round after it chose the returned plan again (the model then held the over-cap plan: a file over budget)."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_compress.adaptive import session as session_module
from lightning_compress.adaptive.candidates import Candidate, layer_candidates
from lightning_compress.adaptive.plan import Problem
from lightning_compress.adaptive.session import Session
from lightning_compress.core.gate import MetricGate
from lightning_compress.quantization.checks import measure
from lightning_compress.quantization.coverage import QUANT_MODULE_TYPES, layer_weight, select_layers, weight_key
from tests.adaptive.digits import trained_digits


class Scripted(Problem):
    """A problem whose solver answers from a list, in order."""

    script: list[dict[str, Candidate]]

    def choose(self, header: int) -> dict[str, Candidate] | None:
        return self.script.pop(0) if self.script else None


def test_deliver_writes_back_the_plan_it_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    model = trained_digits(hidden=(32,), epochs=2, seed=0).model
    layers, _ = select_layers(model, QUANT_MODULE_TYPES)
    weights = {n: layer_weight(n, m) for n, m in layers.items()}
    fisher = {n: torch.ones_like(w) for n, w in weights.items()}
    candidates = {n: layer_candidates(n, layers[n], weights[n], fisher[n], 1.0, 0, "mse", widths=(2, 8),
                                      sparsities=(0.0,)) for n in layers}
    session = Session(model, layers, weights, {n: weight_key(n, m) for n, m in layers.items()},
                      {n: w.detach().clone() for n, w in weights.items()}, fisher, dict.fromkeys(layers, 1.0), "mse",
                      None, measure, MetricGate(None), None)
    small = {n: next(c for c in cs if c.bits == 2) for n, cs in candidates.items()}
    large = {n: next(c for c in cs if c.bits == 8) for n, cs in candidates.items()}
    problem = Scripted(candidates, 0, 0, size_cap=1000, macs_cap=None)
    problem.script = [small, large, small]  # fits, over the cap, the fitting one again
    sizes = iter([900, 1100])
    monkeypatch.setattr(session_module, "file_bytes", lambda _: next(sizes))

    delivered = session.deliver(problem, header=10_000)  # a large reserve: the measured header is solved again

    assert delivered is not None and delivered.plan == small and delivered.file_bytes == 900
    alone = copy.deepcopy(session)
    alone.write(small)
    assert all(torch.equal(weights[n], alone.weights[n]) for n in layers)
    assert not all(torch.equal(weights[n], session.floats[n]) for n in layers)
    assert any("1100 B > cap 1000 B" in step for step in session.steps)
