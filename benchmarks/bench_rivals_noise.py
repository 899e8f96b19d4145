"""How often the rivals' noise rule (issue 23, review 10 B) replaces the plan on noise alone, and how often it takes a
real difference, by simulation through the rule's own code (``session.choose``, ``rivals.clearly_lower``).

    python benchmarks/bench_rivals_noise.py [--draws 2000] [--json PATH]

Per-sample values stand in for the top-1 loss per calibration sample: a difficulty shared by every plan (the same
samples are hard for all of them) plus each plan's own noise, optionally with a heavy tail (2 % of the samples moved
by a unit normal); the plan and ``k`` rivals (k = 1..4: ``compress()`` measures up to the dense plan and three
uniform configurations) have the same true mean under the null. Also: discrete differences (20 of 750 samples
moved by +-1, mean zero, as a top-1 flip), the power at a shift of 1 / 2 / 3 standard errors of the paired
difference (one rival), and the margin of the README's SmallCNN seed-1 0.104x case (29 of 750 samples differ, 18
lower, 11 higher) in standard errors, beside the one-sided levels that a test adjusted for k rivals would need.
No timing: nothing here depends on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch

from lightning_compress.adaptive.rivals import ONE_SE
from lightning_compress.adaptive.session import Rival, choose
from lightning_compress.core.sequential import PairedDifference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import RESULTS, machine_info, write_json


def _draws(generator: torch.Generator, n: int, k: int, heavy: bool, shift: float) -> list[torch.Tensor]:
    """The plan's per-sample values, then ``k`` rivals' (the rivals' true mean ``shift`` away from the plan's)."""
    base = torch.rand(n, generator=generator).pow(4) * 2

    def draw(offset: float) -> torch.Tensor:
        noise = torch.randn(n, generator=generator) * 0.05
        if heavy:
            noise = noise + (torch.rand(n, generator=generator) < 0.02) * torch.randn(n, generator=generator)
        return base + noise + offset

    return [draw(0.0), *(draw(shift) for _ in range(k))]


def _replaced(values: list[torch.Tensor]) -> bool:
    """Whether the rule delivers a rival instead of the plan (rivals in the order of their predicted loss)."""
    own = Rival(float(values[0].mean()), None, "the plan", 0.0, values[0])  # type: ignore[arg-type]
    rivals = [Rival(float(v.mean()), None, f"r{i}", float(i + 1), v)  # type: ignore[arg-type]
              for i, v in enumerate(values[1:])]
    return choose(own, rivals) is not own


def _se(differences: torch.Tensor) -> float:
    """The paired difference's standard error as the rule computes it (its variance floor included)."""
    paired = PairedDifference(population=sys.maxsize, scale=float(differences.abs().max()))
    paired.add(float(differences.sum()), float(differences.square().sum()), differences.numel())
    low, high = paired.interval(ONE_SE)
    return (high - low) / 2


def null_rates(draws: int, seed: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in (256, 1024):
        for heavy in (False, True):
            for k in (1, 2, 3, 4):
                hits = sum(_replaced(_draws(generator, n, k, heavy, 0.0)) for _ in range(draws))
                rows.append({"samples": n, "heavy_tail": heavy, "rivals": k, "replaced": hits / draws})
    hits = 0
    for _ in range(draws):
        moved = torch.zeros(750, dtype=torch.float64)
        where = torch.randperm(750, generator=generator)[:20]
        moved[where] = torch.where(torch.rand(20, generator=generator) < 0.5, 1.0, -1.0).double()
        hits += _replaced([torch.zeros(750, dtype=torch.float64), moved])
    rows.append({"samples": 750, "discrete": "20 of 750 moved by +-1", "rivals": 1, "replaced": hits / draws})
    return rows


def power(draws: int, seed: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    probe = [_draws(generator, 256, 1, False, 0.0) for _ in range(200)]
    se = sum(_se(r - p) for p, r in probe) / len(probe)  # the SE of a difference of means at n = 256
    rows = []
    for multiple in (1.0, 2.0, 3.0):
        hits = sum(_replaced(_draws(generator, 256, 1, False, -multiple * se)) for _ in range(draws))
        rows.append({"samples": 256, "rivals": 1, "shift_in_se": multiple, "replaced": hits / draws})
    return rows


def seed_one_case() -> dict[str, Any]:
    differences = torch.cat([-torch.ones(18), torch.ones(11), torch.zeros(750 - 29)]).double()
    margin = -float(differences.mean()) / _se(differences)
    levels = {f"{k} rivals": NormalDist().inv_cdf(1 - 0.05 / k) for k in (1, 2, 3, 4)}
    return {"margin_in_se": margin, "rule_z": 1.0, "one_sided_5pct_bonferroni_z": levels,
            "kept_by": {"rule": margin > 1.0, **{name: margin > z for name, z in levels.items()}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS / "rivals_noise.json")
    args = parser.parse_args()
    result = {"machine": machine_info(), "draws": args.draws, "seed": args.seed,
              "null": null_rates(args.draws, args.seed), "power": power(args.draws // 2, args.seed + 1),
              "smallcnn_seed1_0.104x": seed_one_case()}
    for row in result["null"] + result["power"]:
        print(row)
    print(result["smallcnn_seed1_0.104x"])
    write_json(args.json, result)


if __name__ == "__main__":
    main()
