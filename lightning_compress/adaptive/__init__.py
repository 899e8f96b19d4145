"""Compress to a budget: per-layer bits, granularity and sparsity chosen together (no Lightning import here).

- :mod:`.budget`: :class:`Budget` (size and / or MACs), checked when made.
- :mod:`.fisher`: the diagonal Fisher from a few backward passes; :mod:`.candidates`: each layer's options with
  exact bytes, MACs and predicted loss increase; :mod:`.knapsack`: the multiple-choice knapsack; :mod:`.plan`: the
  problem and its solution; :mod:`.costs`: what the rest of the model costs, measured file bytes and MACs.
- :mod:`.compress`: :func:`compress` and :mod:`.session`: apply, measure, correct, re-solve.
- A latency budget: :mod:`.units` (structured candidates, per-unit Fisher), :mod:`.latency` (ONNX Runtime timings, the
  per-layer table), :mod:`.latency_budget` (solve, compact, measure, correct).
"""

from lightning_compress.adaptive.budget import Budget
from lightning_compress.adaptive.compress import CompressionResult, compress
from lightning_compress.adaptive.session import BudgetError

__all__ = ["Budget", "BudgetError", "CompressionResult", "compress"]
