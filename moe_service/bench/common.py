"""Timing helpers shared by the benchmarks: interleaved repeats, medians, a results file."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


def timeit(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of `fn` over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def save_results(name: str, results: dict, out_dir: str | Path = "bench-results") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path
