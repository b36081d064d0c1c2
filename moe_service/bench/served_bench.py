"""The served path against the in-process model, in one run: prefill and decode throughput, the
per-MoE-layer dispatch overhead at batch 1, and tokens/s and latency percentiles under 1/8/32 clients."""

from __future__ import annotations

import statistics
import threading
import time

import torch

from moe_service.bench.common import local_service, log
from moe_service.engine import Engine
from moe_service.sampling import SamplingParams


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist() for _ in range(n)]


def in_process(preset: str, prompt_tokens: int, decode_batch: int, decode_tokens: int, repeats: int) -> dict:
    from moe_service.checkpoint import load_model

    model = load_model(preset, progress=True)
    V, L = model.args.vocab_size, len(model.args.moe_layers)
    eng = Engine(model)
    long = _prompts(1, prompt_tokens, V)
    short = _prompts(decode_batch, 32, V, seed=1)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    many = SamplingParams(max_new_tokens=decode_tokens, ignore_eos=True)

    def t(fn) -> float:
        fn()
        return statistics.median([_timed(fn) for _ in range(repeats)])

    prefill = t(lambda: eng.generate(long, one))
    batch_prefill = t(lambda: eng.generate(short, one))
    batch = t(lambda: eng.generate(short, many))
    single_prefill = t(lambda: eng.generate(short[:1], one))
    single = t(lambda: eng.generate(short[:1], many))
    del model, eng
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": decode_batch * (decode_tokens - 1) / (batch - batch_prefill),
        "batch1_step_s": (single - single_prefill) / (decode_tokens - 1),
        "moe_layers": L,
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stream(client, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """(time to first token, [inter-token gaps])"""
    t0 = time.perf_counter()
    times = [time.perf_counter() for tok in client.generate(token_ids=prompt, max_new_tokens=n, ignore_eos=True)
             if tok.token_id >= 0]
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])]


def concurrent(address: str, prompts: list[list[int]], new_tokens: int) -> dict:
    from moe_service.client import Client

    ttfts, gaps, errors, firsts = [], [], [], []
    barrier = threading.Barrier(len(prompts) + 1)

    def run(p):
        try:
            with Client(address) as c:
                barrier.wait(60)
                ttft, g = _stream(c, p, new_tokens)
                ttfts.append(ttft)
                firsts.append(time.perf_counter() - sum(g))
                gaps.extend(g)
        except Exception as e:  # counted below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for th in threads:
        th.start()
    barrier.wait(60)
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)  # noqa
    # decode-only rate: tokens after each stream's first, over the time after the last first token
    decode_window = max(1e-9, time.perf_counter() - max(firsts, default=t0))
    return {"clients": len(prompts), "tokens_per_s": len(prompts) * new_tokens / wall, "errors": len(errors),
            "wall_s": wall,
            "decode_tokens_per_s": len(gaps) / decode_window if len(prompts) > 1 else 1 / statistics.mean(gaps),
            "ttft_p50_s": q(ttfts, 50), "ttft_p99_s": q(ttfts, 99), "itl_p50_s": q(gaps, 50), "itl_p99_s": q(gaps, 99)}


def _gateway_metrics(svc) -> dict[str, float]:
    """Stage sums and counts from the gateway's own /metrics (found through the controller)."""
    import json
    import re
    import urllib.request

    import ray

    http = ray.get(svc.controller().http_address.remote())
    targets = json.load(urllib.request.urlopen(f"http://{http}/targets"))
    gw = next(t["targets"][0] for t in targets if t["labels"].get("component") == "gateway")
    text = urllib.request.urlopen(f"http://{gw}/metrics").read().decode()
    out = {m.group(1) + m.group(2): float(m.group(3)) for m in
           re.finditer(r'moe_step_stage_seconds_(sum|count)\{stage="(\w+)"\} ([\d.e+-]+)', text)}
    return out


def _decode_window(svc, client, prompt: list[int], n: int) -> tuple[list[float], dict[str, float]]:
    """Streams one request; returns its inter-token gaps and the gateway metrics' change over its
    decode steps only (the first snapshot is taken when the first token, the prefill's, arrives)."""
    before, times = None, []
    for tok in client.generate(token_ids=prompt, max_new_tokens=n, ignore_eos=True):
        if tok.token_id < 0:
            continue
        times.append(time.perf_counter())
        if before is None:
            before = _gateway_metrics(svc)
    after = _gateway_metrics(svc)
    return [b - a for a, b in zip(times, times[1:])], {k: after[k] - before.get(k, 0.0) for k in after}


def _echo_process(queue) -> None:
    """A raw gRPC echo server in its own process: the floor for one call to one worker process."""
    import asyncio

    from moe_service.bench.transport_bench import _start_echo

    async def main() -> None:
        _, port = await _start_echo(64 << 20)
        queue.put(port)
        await asyncio.Event().wait()

    asyncio.run(main())


def echo_floor(processes: int, nbytes: int, calls: int = 300) -> float:
    """Median time of `processes` concurrent raw echoes of `nbytes`, one per echo process."""
    import asyncio
    import multiprocessing

    import grpc

    from moe_service.bench.transport_bench import ECHO_METHOD
    from moe_service.transport.options import grpc_options

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_echo_process, args=(queue,), daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        ports = [queue.get(timeout=60) for _ in procs]

        async def run() -> float:
            chans = [grpc.aio.insecure_channel(f"127.0.0.1:{p}", options=grpc_options()) for p in ports]
            echo = [c.unary_unary(ECHO_METHOD) for c in chans]
            blob = bytes(nbytes)
            times = []
            for _ in range(calls + 20):
                t0 = time.perf_counter()
                await asyncio.gather(*(e(blob, timeout=10) for e in echo))
                times.append(time.perf_counter() - t0)
            for c in chans:
                await c.close()
            return statistics.median(times[20:])

        return asyncio.run(run())
    finally:
        for p in procs:
            p.kill()
            p.join(5)


def served(preset: str, workers: int, prompt_tokens: int, decode_batch: int, decode_tokens: int, repeats: int,
           client_counts: tuple[int, ...], concurrency_tokens: int) -> dict:
    import ray

    from moe_service.client import Client
    from moe_service.serving.local import start_service

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=workers, include_dashboard=False, namespace="moe_service", log_to_driver=False)
    max_running = max(max(client_counts), decode_batch)
    cfg = local_service(model=preset, workers=workers,
                        scheduler={"max_running": max_running, "max_seq_len": prompt_tokens + 64,
                                   "prefill_chunk": prompt_tokens, "step_token_budget": 128})
    log(f"[served bench] starting the service: {workers} workers, preset {preset!r}")
    svc = start_service(cfg)
    try:
        from moe_service.checkpoint import open_source

        V = open_source(preset).args.vocab_size
        long = _prompts(1, prompt_tokens, V)[0]
        short = _prompts(decode_batch, 32, V, seed=1)
        with Client(svc.address) as c:
            c.generate_ids(short[0], max_new_tokens=2)  # warm-up
            log("[served bench] prefill")
            prefill = statistics.median([_stream(c, long, 1)[0] for _ in range(repeats)])
            log("[served bench] batch-1 decode")
            gaps, d = [], {}
            for _ in range(repeats):
                g, delta = _decode_window(svc, c, short[0], decode_tokens)
                gaps.extend(g)
                d = {k: d.get(k, 0.0) + v for k, v in delta.items()}
        log(f"[served bench] decode, batch {decode_batch}")
        dec = concurrent(svc.address, short, decode_tokens)
        layer_calls = d.get("countexperts", 0.0) or 1.0  # one expert stage per MoE layer per decode step
        # the transport's own cost per MoE layer: planning, the wait beyond the slowest worker's
        # compute (the gateway's "wire" stage, per layer call), and combining
        overhead = (d.get("sumdispatch", 0) + d.get("sumwire", 0) + d.get("sumcombine", 0)) / layer_calls
        log(f"[served bench] raw gRPC echo to {workers} processes (the floor of one dispatch)")
        H = open_source(preset).args.hidden_size
        floor = echo_floor(workers, H * 4 + 6 * 8)  # one fp32 row and its (expert, weight) pairs
        out = {"prefill_tokens_per_s": prompt_tokens / prefill, "decode_tokens_per_s": dec["decode_tokens_per_s"],
               "batch1_step_s": statistics.median(gaps), "dispatch_overhead_per_layer_s": overhead,
               "echo_floor_s": floor, "batch1_layer_calls": layer_calls,
               "batch1_stage_s_per_layer": {k: d.get("sum" + k, 0) / layer_calls
                                            for k in ("dispatch", "experts", "wire", "combine")},
               "batch1_worker_compute_s_per_layer": (d.get("sumexperts", 0) - d.get("sumwire", 0)) / layer_calls, "concurrency": []}
        for n in client_counts:
            log(f"[served bench] {n} concurrent clients")
            prompts = _prompts(n, 32, V, seed=100 + n)
            out["concurrency"].append(concurrent(svc.address, prompts, concurrency_tokens))
        return out
    finally:
        svc.shutdown()


def run(preset: str = "bench", workers: int = 2, prompt_tokens: int = 256, decode_batch: int = 8,
        decode_tokens: int = 16, repeats: int = 3, client_counts: tuple[int, ...] = (1, 8, 32),
        concurrency_tokens: int = 16) -> dict:
    log(f"[served bench] in-process reference on {preset!r}")
    ref = in_process(preset, prompt_tokens, decode_batch, decode_tokens, repeats)
    srv = served(preset, workers, prompt_tokens, decode_batch, decode_tokens, repeats, client_counts,
                 concurrency_tokens)
    L = ref["moe_layers"]
    return {
        "preset": preset, "workers": workers, "threads": torch.get_num_threads(), "in_process": ref, "served": srv,
        "ratios": {"prefill": srv["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"],
                   "decode": srv["decode_tokens_per_s"] / ref["decode_tokens_per_s"]},
        "step_difference_per_moe_layer_s": (srv["batch1_step_s"] - ref["batch1_step_s"]) / L,
        "dispatch_overhead_per_moe_layer_s": srv["dispatch_overhead_per_layer_s"],
        "echo_floor_s": srv["echo_floor_s"],
    }


def format_results(r: dict) -> str:
    ref, srv = r["in_process"], r["served"]
    lines = [
        f"preset {r['preset']}, {r['workers']} expert workers, fp32",
        f"{'':26}{'in-process':>12}{'served':>12}{'ratio':>8}",
        f"{'prefill tokens/s':26}{ref['prefill_tokens_per_s']:12.1f}{srv['prefill_tokens_per_s']:12.1f}"
        f"{r['ratios']['prefill']:7.2f}x",
        f"{'decode tokens/s (8 seqs)':26}{ref['decode_tokens_per_s']:12.1f}{srv['decode_tokens_per_s']:12.1f}"
        f"{r['ratios']['decode']:7.2f}x",
        f"{'batch-1 step (ms)':26}{ref['batch1_step_s'] * 1e3:12.2f}{srv['batch1_step_s'] * 1e3:12.2f}",
        f"dispatch overhead per MoE layer at batch 1: {r['dispatch_overhead_per_moe_layer_s'] * 1e3:.2f} ms "
        f"(plan + wait beyond the slowest worker's compute + combine; the slowest worker computed "
        f"{srv['batch1_worker_compute_s_per_layer'] * 1e3:.2f} ms per layer)",
        f"the floor: a raw gRPC echo of one token's bytes to {r['workers']} processes at once took "
        f"{r['echo_floor_s'] * 1e3:.2f} ms ({r['dispatch_overhead_per_moe_layer_s'] / r['echo_floor_s']:.2f}x)",
        f"batch-1 step difference per MoE layer (served - in-process): "
        f"{r['step_difference_per_moe_layer_s'] * 1e3:.2f} ms over {ref['moe_layers']} MoE layers",
        "",
        f"{'clients':>8}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}{'errors':>8}",
    ]
    for c in srv["concurrency"]:
        lines.append(f"{c['clients']:8d}{c['tokens_per_s']:10.1f}{c['ttft_p50_s'] * 1e3:9.0f}ms"
                     f"{c['ttft_p99_s'] * 1e3:9.0f}ms{c['itl_p50_s'] * 1e3:9.0f}ms{c['itl_p99_s'] * 1e3:9.0f}ms"
                     f"{c['errors']:8d}")
    conc = srv["concurrency"]
    if len(conc) >= 2:
        lines.append(f"{conc[-1]['clients']} vs {conc[0]['clients']} clients: "
                     f"{conc[-1]['tokens_per_s'] / conc[0]['tokens_per_s']:.1f}x tokens/s, "
                     f"p99 ITL {conc[-1]['itl_p99_s'] / max(conc[0]['itl_p99_s'], 1e-9):.2f}x")
    return "\n".join(lines)
