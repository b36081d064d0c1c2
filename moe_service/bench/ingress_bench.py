"""What a streamed token costs at the front: the CPU of every process a token crosses on its way from the
engine to the client's socket, per token, at 1, 32 and 128 streams, with one message per token (what every
client got before `stream_interval`) beside coalesced messages, in one run.

Counted: Serve's proxy (every thread), the gateway replica's threads but the engine's (its event loop,
Ray's and gRPC's threads: the replica's own streaming work), and the HTTP front where it is in the path.
Not counted: the model step (the engine's threads, named `moe-engine` and `moe-microbatch`), the workers,
the client. The model is `tiny` and the gateway computes on one thread, so a step is short and the
streaming work is most of what the service does."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from moe_service.bench.common import log, save_figure
from moe_service.bench.overload import proxy_pid

ENGINE_THREADS = ("moe-engine", "moe-microbatch")


def _cpu_of(pid: int, skip: tuple[str, ...] = ()) -> float:
    """CPU seconds (user + system) of a process's threads whose OS name is not in `skip`."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() in skip:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):  # a thread that ended meanwhile
            continue
    return total / tick


def _streams(address: str, n: int, tokens: int, interval: int) -> tuple[int, float]:
    """n concurrent streams of `tokens` tokens each: (tokens received, seconds)."""
    import grpc

    from moe_service.transport.pb import moe_pb2, moe_pb2_grpc

    got = [0] * n

    def one(i: int) -> None:
        with grpc.insecure_channel(address) as ch:
            req = moe_pb2.GenerateRequest(stream_interval=interval, params=moe_pb2.SamplingParams(
                max_new_tokens=tokens, ignore_eos=True))
            req.token_ids.ids.extend([1, 3 + i % 400, 7])
            for m in moe_pb2_grpc.InferenceStub(ch).Generate(req, timeout=600):
                got[i] += len(m.tokens) if m.tokens else int(m.token_id >= 0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(got), time.perf_counter() - t0


def measure(svc, streams: int, tokens: int, interval: int) -> dict:
    from ray import serve

    gateway = serve.get_app_handle("moe").debug_state.remote().result()["pid"]
    proxy = proxy_pid()
    before = _cpu_of(proxy), _cpu_of(gateway, ENGINE_THREADS), _cpu_of(gateway)
    n, seconds = _streams(svc.address, streams, tokens, interval)
    after = _cpu_of(proxy), _cpu_of(gateway, ENGINE_THREADS), _cpu_of(gateway)
    proxy_s, replica_s, gateway_s = (b - a for a, b in zip(before, after))
    return {"streams": streams, "stream_interval": interval, "tokens": n, "seconds": seconds,
            "tokens_per_s": n / seconds, "proxy_cpu_s": proxy_s, "replica_streaming_cpu_s": replica_s,
            "engine_cpu_s": gateway_s - replica_s, "ingress_cpu_us_per_token": (proxy_s + replica_s) / n * 1e6}


def run(streams: tuple[int, ...] = (1, 32, 128), tokens: int = 64, intervals: tuple[int, ...] = (0, 1, 8),
        out_dir: str = "bench-results") -> dict:
    import ray

    from moe_service.bench.common import local_service
    from moe_service.serving.local import start_service

    if not ray.is_initialized():
        from moe_service.serving.proxy_limits import RUNTIME_ENV

        ray.init(num_cpus=2, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                 runtime_env=RUNTIME_ENV)
    svc = start_service(local_service(model="tiny", workers=2, http_api=False, gateway_torch_threads=1,
                                      scheduler={"max_running": max(streams), "max_seq_len": tokens + 16}))
    rows = []
    try:
        _streams(svc.address, 4, 8, 0)  # warm-up
        for n in streams:
            for interval in intervals:  # side by side, for each load
                log(f"[ingress bench] {n} streams, stream_interval {interval}")
                rows.append(measure(svc, n, tokens, interval))
    finally:
        svc.shutdown()
    r = {"tokens_per_stream": tokens, "rows": rows}
    r["plot"] = plot(r, out_dir)
    return r


def plot(r: dict, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for interval in sorted({row["stream_interval"] for row in r["rows"]}):
        rows = [row for row in r["rows"] if row["stream_interval"] == interval]
        label = "one message per token (before)" if interval == 0 else f"stream_interval {interval}"
        ax.plot([row["streams"] for row in rows], [row["ingress_cpu_us_per_token"] for row in rows], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("ingress CPU per token (µs)")
    ax.set_ylim(bottom=0)
    ax.set_title("CPU at the front per streamed token (measured, tiny model)")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, "ingress.png")


def format_results(r: dict) -> str:
    lines = [f"ingress CPU per streamed token (Serve's proxy + the gateway replica's streaming threads), "
             f"{r['tokens_per_stream']} tokens per stream, tiny model",
             f"{'streams':>8}{'interval':>9}{'tokens/s':>10}{'proxy':>10}{'replica':>10}{'us/token':>10}{'vs 0':>7}"]
    base: dict[int, float] = {}
    for row in r["rows"]:
        us = row["ingress_cpu_us_per_token"]
        base.setdefault(row["streams"], us) if row["stream_interval"] == 0 else None
        ratio = base.get(row["streams"], us) / us
        lines.append(f"{row['streams']:>8}{row['stream_interval']:>9}{row['tokens_per_s']:>10.0f}"
                     f"{row['proxy_cpu_s']:>9.2f}s{row['replica_streaming_cpu_s']:>9.2f}s{us:>10.0f}{ratio:>6.1f}x")
    return "\n".join(lines) + (f"\nplot: {r['plot']}" if r.get("plot") else "")
