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
    """A service config for the served benchmarks on this machine (workers on logical GPUs, computing
    on its CPU cores).

    The gateway's attention and the workers' experts alternate within a step, so the gateway may use
    two threads while one thread per worker keeps the experts in parallel. Work overlapping the
    expert calls (shared experts, a second micro-batch) follows `overlap_pays`: on a machine of a few
    cores it slows the workers more than it hides (docs/performance.md)."""
    from moe_service.serving.config import overlap_pays

    scheduler = {"micro_batches": 2 if overlap_pays(False) else 1, **settings.pop("scheduler", {})}
    return dict(gpus_per_worker=1.0, gateway_num_cpus=0, expert_bind_host="127.0.0.1", gateway_torch_threads=2,
                overlap_shared_experts=overlap_pays(False), sd_port=0, rebalance_interval_s=0, scheduler=scheduler,
                **settings)
