"""Problem.dense: the unpruned part of a problem, the dense fallback compress() verifies where the sparse problem's
larger header leaves no plan within the cap."""

from __future__ import annotations

from lightning_compress.adaptive.candidates import Candidate
from lightning_compress.adaptive.plan import Problem


def _candidate(layer: str, bits: int, sparsity: float, nbytes: int) -> Candidate:
    return Candidate(layer, bits, "per_channel", None, sparsity, nbytes, 10, 1.0 / bits)


def test_dense_keeps_the_unpruned_candidates_and_the_corrections() -> None:
    candidates = {n: [_candidate(n, 2, 0.0, 30), _candidate(n, 2, 0.9, 20), _candidate(n, 4, 0.0, 50)]
                  for n in ("a", "b")}
    problem = Problem(candidates, 7, 3, size_cap=200, macs_cap=None, multipliers={"a": 2.0}, buckets=64)
    dense = problem.dense()
    assert dense is not None
    assert {n: [c.sparsity for c in cs] for n, cs in dense.candidates.items()} == {"a": [0.0, 0.0], "b": [0.0, 0.0]}
    assert (dense.fixed_bytes, dense.other_macs, dense.size_cap, dense.macs_cap, dense.buckets) == (7, 3, 200, None, 64)
    assert dense.multipliers == {"a": 2.0} and dense.multipliers is not problem.multipliers
    assert dense.dense() is None  # nothing pruned left
    only_pruned = Problem({"a": [_candidate("a", 2, 0.5, 10)]}, 0, 0, size_cap=100, macs_cap=None)
    assert only_pruned.dense() is None  # a layer without an unpruned candidate: no dense problem
