"""Small shared helpers for the benchmarks: timing (median of repeats after warm-up, ``time.perf_counter``) and
the machine description + JSON writer behind every script's ``--json`` file (read by ``run_all.py``).

``measure(fn)`` times one callable; ``measure_interleaved({"a": fa, "b": fb})`` times several callables in
alternation (a, b, a, b, ...) so that a burst of load from another process on a shared machine hits all of them
alike, which keeps their *ratio* stable even when the absolute figures wobble.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    """Per-call seconds of each repeat (a repeat runs the callable ``inner`` times and is divided by it)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median_ms(self) -> float:
        return 1e3 * self.median

    def spread(self) -> float:
        """(max - min) / median: a quick noise indicator."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else 0.0


def _one_repeat(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def measure(fn: Callable[[], object], *, repeats: int = 15, warmup: int = 3, inner: int = 1) -> Timing:
    """Run ``fn`` ``warmup * inner`` times untimed, then ``repeats`` timed blocks of ``inner`` calls."""
    return measure_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, inner=inner)["fn"]


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 15,
    warmup: int = 3,
    inner: int | Mapping[str, int] = 1,
) -> dict[str, Timing]:
    """Time several callables in alternation; ``inner`` may differ per callable (a dict keyed like ``fns``)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    inners = {name: (inner[name] if isinstance(inner, Mapping) else inner) for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup * inners[name]):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_one_repeat(fn, inners[name]))
    return {name: Timing(tuple(s)) for name, s in samples.items()}


# ---------------------------------------------------------------------------------------------- results files
def cpu_model() -> str:
    """The CPU's ``model name`` from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(quick: bool | None = None) -> dict[str, Any]:
    """Where and how a figure was measured. Imports nothing heavy: torch's thread count is read only when the
    caller has imported torch already (every benchmark has; ``run_all.py`` has not)."""
    torch = sys.modules.get("torch")
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": _version("torch"),
        "lightning": _version("lightning"), "python": platform.python_version(),
        "threads": torch.get_num_threads() if torch is not None else None,
        # int8 speed depends on it (AVX2 / AVX512 / AVX512_VNNI ...): every speed figure carries it
        "cpu_capability": torch.backends.cpu.get_cpu_capability() if torch is not None else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if quick is not None:
        info["mode"] = "quick" if quick else "full"
    return info


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` as indented JSON at ``path`` (parent folders created), and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"written: {path}")
