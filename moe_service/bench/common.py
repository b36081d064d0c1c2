"""Timing helpers shared by the benchmarks: interleaved repeats, medians, a results file."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


def timeit(fn: Callable[[], object], repeats: int = 3, warmup: int = 1,
           reduce: Callable[[list[float]], float] = statistics.median) -> float:
    """Median (or `reduce`) seconds of `fn` over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return reduce(times)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def save_results(name: str, results: dict, out_dir: str | Path = "bench-results") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def local_service(**settings) -> dict:
    """A service config for the served benchmarks on this machine: CPU workers (so the overlap of work
    with the expert calls follows `ServiceConfig.overlap` for CPU workers: on a machine of a few cores it
    slows the workers more than it hides, docs/performance.md). The gateway's attention and the workers'
    experts alternate within a step, so the gateway may use two threads while one thread per worker
    keeps the experts in parallel."""
    return {"gpus_per_worker": 0.0, "gateway_num_cpus": 0, "expert_bind_host": "127.0.0.1", "gateway_torch_threads": 2,
            "sd_port": 0, "rebalance_interval_s": 0, **settings}


def save_figure(fig, out_dir: str | Path, name: str) -> str:
    """Lays out, writes `out_dir/name` and closes a matplotlib figure; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
