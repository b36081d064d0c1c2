"""Overload: bursts of concurrent Generate calls at 1x, 2x, 4x and 8x the service's capacity, from one
asyncio gRPC client, as an operator's load test sends them. Reports goodput (exact completions per
second), rejections and how fast they came, latency of the admitted requests, and the resident memory
of the gateway and Serve's proxy after each burst."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time

import grpc

from moe_service.bench.common import log, save_figure
from moe_service.transport.memory import process_memory

CAPACITY = 300  # the 1x burst: what the default limits admit at once (max_running + max_queue >= 300)


def _q(xs: list[float], p: int) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def _burst(address: str, n: int, prompt: list[int], new_tokens: int, want: list[int], timeout_s: float) -> dict:
    from moe_service.transport.pb import moe_pb2, moe_pb2_grpc

    req = moe_pb2.GenerateRequest(token_ids=moe_pb2.TokenIds(ids=prompt),
                                  params=moe_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    codes: dict[str, int] = {}
    admitted_latency, reject_latency, invalid_latency, pushback, wrong = [], [], [], [], 0
    other_errors: list[str] = []
    messages: set[str] = set()
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = moe_pb2_grpc.InferenceStub(ch)

        async def one() -> None:
            nonlocal wrong
            t0 = time.perf_counter()
            call = stub.Generate(req, timeout=timeout_s)
            tokens = []
            try:
                async for r in call:
                    if r.token_id >= 0:
                        tokens.append(r.token_id)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED and len(other_errors) < 5:
                    other_errors.append(f"{code.name} after {time.perf_counter() - t0:.2f}s, {len(tokens)} tokens: "
                                        f"{e.details()}")
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    invalid_latency.append(time.perf_counter() - t0)
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    reject_latency.append(time.perf_counter() - t0)
                    messages.add(e.details() or "")
                    hint = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    if hint is not None:
                        pushback.append(int(hint))
            codes[code.name] = codes.get(code.name, 0) + 1
            if code == grpc.StatusCode.OK:
                admitted_latency.append(time.perf_counter() - t0)
                wrong += tokens != want

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
    exact = codes.get("OK", 0) - wrong
    return {"offered": n, "codes": codes, "exact": exact, "wrong": wrong, "wall_s": wall, "goodput": exact / wall,
            "latency_p50_s": _q(admitted_latency, 50), "latency_p99_s": _q(admitted_latency, 99),
            "reject_p99_s": _q(reject_latency, 99), "reject_max_s": max(reject_latency, default=0.0),
            "invalid_p99_s": _q(invalid_latency, 99), "reject_messages": sorted(messages)[:3],
            "retry_pushback_ms": statistics.median(pushback) if pushback else None,
            "pushback_on_every_rejection": len(pushback) == len(reject_latency), "other_errors": other_errors}


def burst(address: str, n: int, prompt: list[int], new_tokens: int, want: list[int], timeout_s: float = 300.0) -> dict:
    return asyncio.run(_burst(address, n, prompt, new_tokens, want, timeout_s))


def rss_bytes(pid: int) -> int:
    return process_memory(pid)["VmRSS"]


def rss_over_high_water(rows: list[dict]) -> dict:
    """The last burst's RSS against the highest of every burst before it, for the gateway and Serve's proxy.
    A leak grows memory burst after burst, past any earlier peak; allocator noise moves a process's RSS
    up and down within its peak (the proxy's went between 438 and 482 MB over 4x bursts in a row), so one
    burst against the one just before it measures that noise, not a leak."""
    last, earlier = rows[-1], rows[:-1]
    return {k: last[k] / max(r[k] for r in earlier) - 1 for k in ("gateway_rss", "proxy_rss")}


def proxy_pid() -> int:
    """Serve's proxy on this machine, by its process title (Ray names actor processes `ray::Class`)."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::ProxyActor"):
                return int(proc.name)
        except OSError:  # a process that ended meanwhile
            continue
    raise RuntimeError("no Serve proxy process on this machine")


def sweep(svc, preset: str, factors: tuple[int, ...] = (1, 2, 4, 8), new_tokens: int = 8, base_bursts: int = 2) -> dict:
    """Bursts at each factor of CAPACITY against a running service, then two more identical 4x bursts:
    the last of those may not hold more memory than the high-water mark of every burst before it (which
    the sweep's own bursts have set by then; a leak would grow it burst after burst).
    Goodput is compared with the median of `base_bursts` 1x bursts, the first and the others at the end:
    one burst of a few seconds on a shared machine is a noisy yardstick."""
    from ray import serve

    from moe_service import load_model
    from moe_service.engine.engine import Engine
    from moe_service.engine.sampling import SamplingParams

    prompt = [1, 17, 42]
    want = Engine(load_model(preset)).generate([prompt], SamplingParams(max_new_tokens=new_tokens,
                                                                        ignore_eos=True))[0].output
    gateway = serve.get_app_handle("moe")
    burst(svc.address, 8, prompt, new_tokens, want)  # warm-up
    # the floor of a refusal: the same burst, every request refused at once by the gateway's checks
    # (a token id out of range), so what it costs is the ingress alone (Serve's proxy, Ray, the client)
    log(f"[overload] the ingress floor: {4 * CAPACITY} requests refused at once")
    floor = burst(svc.address, 4 * CAPACITY, [10**6], new_tokens, want)
    rows = []
    rejected = gateway.debug_state.remote().result()["rejected"]
    for f in [*factors, 4, 4]:
        log(f"[overload] {f}x: {f * CAPACITY} concurrent requests")
        r = burst(svc.address, f * CAPACITY, prompt, new_tokens, want)
        state = gateway.debug_state.remote().result()
        r["rejected_by_gateway"], rejected = state["rejected"] - rejected, state["rejected"]
        r.update(factor=f, gateway_rss=state["rss_bytes"], proxy_rss=rss_bytes(proxy_pid()),
                 server_reject_p99_s=state["rejection_p99_s"], loop_lag_p99_s=state["loop_lag_p99_s"])
        rows.append(r)
    ones = [rows[0]["goodput"]]
    for i in range(base_bursts - 1):
        log(f"[overload] 1x again ({i + 2}/{base_bursts}): the base goodput")
        ones.append(burst(svc.address, CAPACITY, prompt, new_tokens, want)["goodput"])
    base = statistics.median(ones)
    for r in rows:
        r["goodput_vs_1x"] = r["goodput"] / base if base else 0.0
    first4, again4 = rows[-2], rows[-1]
    out = {"preset": preset, "capacity": CAPACITY, "new_tokens": new_tokens, "rows": rows[:-2],
            "goodput_1x_bursts": ones, "goodput_1x": base,
            "first_4x": first4,
            "ingress_floor_4x": {"p99_s": floor["invalid_p99_s"], "wall_s": floor["wall_s"], "codes": floor["codes"]},
            "second_4x": again4,
            "rss_over_high_water": rss_over_high_water(rows)}
    out["front_4x"] = front_burst(svc, prompt, new_tokens, want, base)
    return out


def front_burst(svc, prompt: list[int], new_tokens: int, want: list[int], base_goodput: float) -> dict | None:
    """The 4x burst again, through HAProxy in front of the same service (moe_service.serving.front),
    limited to what the gateway admits: refusals before any Python process sees the call. None without
    haproxy installed."""
    from moe_service.serving.config import ServiceConfig
    from moe_service.serving.front import HAProxyFront, gateway_capacity

    if shutil.which("haproxy") is None:
        log("[overload] haproxy is not installed: no burst through the gRPC front")
        return None
    log(f"[overload] 4x through the gRPC front (HAProxy): {4 * CAPACITY} concurrent requests")
    with HAProxyFront(svc.address, gateway_capacity(ServiceConfig.from_dict(svc.config))) as front:
        burst(front.address, 8, prompt, new_tokens, want)  # its connections up
        r = burst(front.address, 4 * CAPACITY, prompt, new_tokens, want)
        r["front_rss"], r["front_limit"] = rss_bytes(front.pid), front.limit
    r.update(factor=4, goodput_vs_1x=r["goodput"] / base_goodput if base_goodput else 0.0)
    return r


def format_results(r: dict) -> str:
    return format_sweep(r) + (f"\nplot: {r['plot']}" if r.get("plot") else "")


def format_sweep(r: dict) -> str:
    lines = [f"overload sweep, preset {r['preset']}: bursts of concurrent Generate calls (3-token prompt, "
             f"{r['new_tokens']} new tokens, greedy), 1x = {r['capacity']}",
             f"{'load':>5}{'offered':>8}{'ok':>6}{'exact':>6}{'rejected':>9}{'other':>6}{'goodput':>9}{'vs 1x':>7}"
             f"{'p50':>8}{'p99':>8}{'reject p99':>11}{'server':>8}{'gw RSS':>9}{'proxy RSS':>10}"]
    for row in [*r["rows"], r["first_4x"], r["second_4x"]]:
        c = row["codes"]
        other = sum(v for k, v in c.items() if k not in ("OK", "RESOURCE_EXHAUSTED"))
        lines.append(f"{row['factor']:>4}x{row['offered']:8d}{c.get('OK', 0):6d}{row['exact']:6d}"
                     f"{c.get('RESOURCE_EXHAUSTED', 0):9d}{other:6d}{row['goodput']:8.1f}/s{row['goodput_vs_1x']:6.2f}x"
                     f"{row['latency_p50_s']:7.2f}s{row['latency_p99_s']:7.2f}s{row['reject_p99_s'] * 1e3:9.0f}ms"
                     f"{row['server_reject_p99_s'] * 1e3:6.0f}ms{row['gateway_rss'] / 2**20:7.0f}MB"
                     f"{row['proxy_rss'] / 2**20:8.0f}MB")
    f = r["ingress_floor_4x"]
    lines.append(f"ingress floor: {r['capacity'] * 4} requests the gateway refuses at once (a bad token id) came back "
                 f"in {f['wall_s']:.2f} s, p99 {f['p99_s']:.2f} s, as the client saw them ({f['codes']})")
    if r.get("front_4x"):
        x = r["front_4x"]
        c = x["codes"]
        lines.append(f"through the gRPC front (HAProxy, limit {x['front_limit']}): 4x: ok {c.get('OK', 0)}, "
                     f"exact {x['exact']}, rejected {c.get('RESOURCE_EXHAUSTED', 0)}, goodput {x['goodput']:.1f}/s "
                     f"({x['goodput_vs_1x']:.2f}x), p50 {x['latency_p50_s']:.2f}s, refusal p99 "
                     f"{x['reject_p99_s'] * 1e3:.0f} ms (max {x['reject_max_s'] * 1e3:.0f} ms), retry hint in the "
                     f"trailer on {'every' if x['pushback_on_every_rejection'] else 'not every'} refusal, "
                     f"HAProxy RSS {x['front_rss'] / 2**20:.0f} MB")
    g = r["rss_over_high_water"]
    lines.append(f"after the last 4x burst, against the highest RSS after any burst before it: the gateway's "
                 f"{g['gateway_rss']:+.1%}, the proxy's {g['proxy_rss']:+.1%}")
    return "\n".join(lines)


def run(preset: str = "tiny", workers: int = 2, out_dir: str = "bench-results") -> dict:
    """The sweep against a service started here with default limits, and its plot."""
    import ray

    from moe_service.bench.common import local_service
    from moe_service.serving.local import start_service
    from moe_service.serving.proxy_limits import RUNTIME_ENV

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=workers, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                 runtime_env=RUNTIME_ENV)
    svc = start_service(local_service(model=preset, workers=workers))
    try:
        r = sweep(svc, preset)
    finally:
        svc.shutdown()
    r["plot"] = plot(r, out_dir)
    return r


def plot(r: dict, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    offered = [row["offered"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(offered, [row["goodput"] for row in rows], "o-", label="goodput (exact completions/s)")
    ax.plot(offered, [row["codes"].get("RESOURCE_EXHAUSTED", 0) / row["wall_s"] for row in rows], "s--",
            label="refused (RESOURCE_EXHAUSTED)/s")
    ax.set_xlabel("concurrent requests in the burst")
    ax.set_ylabel("per second")
    ax.set_xticks(offered, [f"{n}\n({n // r['capacity']}x)" for n in offered])
    ax.set_ylim(bottom=0)
    ax.set_title(f"overload, preset {r['preset']} (measured)")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, "overload.png")
