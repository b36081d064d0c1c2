"""The served path against the in-process model, in one run: prefill and decode throughput, the
end-to-end cost of a served MoE layer at batch 1 against the floor of a streamed echo (measured
alternately), with the gateway's stage timers as its breakdown, and tokens/s and latency
percentiles under 1/8/32 gRPC clients, and 1/8 clients of the OpenAI HTTP API beside them."""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from moe_service.bench.common import local_service, log
from moe_service.engine.engine import Engine
from moe_service.engine.sampling import SamplingParams


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
    # where a batch-1 decode step's time goes, per MoE layer call: attention and the routed experts,
    # timed with hooks (the served side has the gateway's stage timers for the same)
    parts: dict[str, list[float]] = {"attention": [], "routed": []}
    for layer in model.layers:
        if layer.is_moe:
            for name, module in (("attention", layer.self_attn), ("routed", layer.mlp.experts)):
                module.register_forward_pre_hook(lambda *_, n=name: parts[n].append(-time.perf_counter()))
                module.register_forward_hook(lambda *_, n=name: parts[n].append(parts[n].pop() + time.perf_counter()))
    eng.generate(short[:1], many)
    del model, eng
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": decode_batch * (decode_tokens - 1) / (batch - batch_prefill),
        "batch1_step_s": (single - single_prefill) / (decode_tokens - 1),
        # decode calls only (the first L are the prompt's)
        "batch1_s_per_layer": {k: statistics.median(v[L:]) for k, v in parts.items()},
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


class HTTPClient:
    """The OpenAI API's streamed completions on one keep-alive connection, timed as `_stream` times gRPC
    (standard library only: the benchmark measures the service, not a client package)."""

    def __init__(self, address: str) -> None:
        import http.client

        host, port = address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=300)

    def __enter__(self) -> "HTTPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.conn.close()

    def generate(self, token_ids: list[int], max_new_tokens: int, ignore_eos: bool = True):
        body = json.dumps({"prompt": token_ids, "max_tokens": max_new_tokens, "temperature": 0, "stream": True,
                           "ignore_eos": ignore_eos})
        self.conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            yield _Chunk(-1 if choice["finish_reason"] else 0)


@dataclass
class _Chunk:
    token_id: int


def concurrent(address: str, prompts: list[list[int]], new_tokens: int, api: str = "gRPC") -> dict:
    """`len(prompts)` clients at once, each streaming one greedy generation over gRPC, or over the OpenAI
    HTTP API when `api` is "HTTP" (then `address` is the HTTP proxy's)."""
    from moe_service.client import Client

    ttfts, gaps, errors, firsts = [], [], [], []
    barrier = threading.Barrier(len(prompts) + 1)
    connect = HTTPClient if api == "HTTP" else Client

    def run(p):
        try:
            with connect(address) as c:
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
    return {"api": api, "clients": len(prompts), "tokens_per_s": len(prompts) * new_tokens / wall, "errors": len(errors),
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
    decode steps only. The first snapshot is taken at the second token: a step's metrics are observed
    just after its tokens go out, so at the first token the prefill's may not be in yet."""
    before, times = None, []
    for tok in client.generate(token_ids=prompt, max_new_tokens=n, ignore_eos=True):
        if tok.token_id < 0:
            continue
        times.append(time.perf_counter())
        if len(times) == 2:
            before = _gateway_metrics(svc)
    after = _gateway_metrics(svc)
    return [b - a for a, b in zip(times[1:], times[2:])], {k: after[k] - before.get(k, 0.0) for k in after}


def _echo_process(queue) -> None:
    """A raw gRPC echo server in its own process: the floor for one call to one worker process."""
    import asyncio

    from moe_service.bench.transport_bench import _start_echo

    async def main() -> None:
        _, port = await _start_echo(64 << 20)
        queue.put(port)
        await asyncio.Event().wait()

    asyncio.run(main())


class EchoFloor:
    """Raw echo servers in processes of their own, one per expert worker, reached on persistent
    streams as the gateway reaches its workers: the floor of one layer's dispatch."""

    def __init__(self, processes: int) -> None:
        import multiprocessing

        from moe_service.bench.transport_bench import StreamEcho

        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        self.procs = [ctx.Process(target=_echo_process, args=(queue,), daemon=True) for _ in range(processes)]
        for p in self.procs:
            p.start()
        self.echo = StreamEcho([queue.get(timeout=60) for _ in self.procs])

    def measure(self, nbytes: int, calls: int = 200) -> list[float]:
        """Round-trip times of `nbytes` to every echo process at once."""
        blob = bytes(nbytes)
        times = []
        for i in range(calls + 20):  # 20 to warm up
            t0 = time.perf_counter()
            self.echo.round_trip(blob)
            if i >= 20:
                times.append(time.perf_counter() - t0)
        return times

    def close(self) -> None:
        self.echo.close()
        for p in self.procs:
            p.kill()
            p.join(5)


def served(preset: str, workers: int, prompt_tokens: int, decode_batch: int, decode_tokens: int, repeats: int,
           client_counts: tuple[int, ...], concurrency_tokens: int, micro_batches: int | None = None,
           http_client_counts: tuple[int, ...] = (1, 8)) -> dict:
    import ray

    from moe_service.client import Client
    from moe_service.serving.local import start_service

    if not ray.is_initialized():
        from moe_service.serving.proxy_limits import RUNTIME_ENV

        ray.init(num_cpus=2, num_gpus=workers, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                 runtime_env=RUNTIME_ENV)
    max_running = max(max(client_counts), decode_batch)
    cfg = local_service(model=preset, workers=workers,
                        scheduler={"max_running": max_running, "max_seq_len": prompt_tokens + 64,
                                   "prefill_chunk": prompt_tokens, "step_token_budget": 128,
                                   **({"micro_batches": micro_batches} if micro_batches else {})})
    log(f"[served bench] starting the service: {workers} workers, preset {preset!r}")
    svc = start_service(cfg)
    try:
        from moe_service.checkpoint import open_source

        V = open_source(preset).args.vocab_size
        long = _prompts(1, prompt_tokens, V)[0]
        short = _prompts(decode_batch, 32, V, seed=1)
        H = open_source(preset).args.hidden_size
        floor = EchoFloor(workers)
        floors: list[float] = []
        try:
            with Client(svc.address) as c:
                c.generate_ids(short[0], max_new_tokens=2)  # warm-up
                log("[served bench] prefill")
                prefill = statistics.median([_stream(c, long, 1)[0] for _ in range(repeats)])
                log(f"[served bench] batch-1 decode, alternating with a streamed echo to {workers} processes")
                gaps, d = [], {}
                for _ in range(repeats):
                    g, delta = _decode_window(svc, c, short[0], decode_tokens)
                    gaps.extend(g)
                    d = {k: d.get(k, 0.0) + v for k, v in delta.items()}
                    floors.extend(floor.measure(H * 4 + 6 * 8))  # one fp32 row and its (expert, weight) pairs
        finally:
            floor.close()
        log(f"[served bench] decode, batch {decode_batch}")
        dec = concurrent(svc.address, short, decode_tokens)
        # one observation per stage per step (summed over its layers): a batch-1 step has one layer call per MoE layer
        layer_calls = d.get("countexperts", 0.0) * len(open_source(preset).args.moe_layers) or 1.0
        stages = {k: d.get("sum" + k, 0) / layer_calls
                  for k in ("attention", "gating", "dispatch", "experts", "wire", "combine")}
        out = {"prefill_tokens_per_s": prompt_tokens / prefill, "decode_tokens_per_s": dec["decode_tokens_per_s"],
               "batch1_step_s": statistics.median(gaps), "echo_floor_s": statistics.median(floors),
               "batch1_layer_calls": layer_calls, "batch1_stage_s_per_layer": stages,
               "batch1_worker_compute_s_per_layer": stages["experts"] - stages["wire"], "concurrency": []}
        for n in client_counts:
            prompts = _prompts(n, 32, V, seed=100 + n)
            log(f"[served bench] {n} concurrent clients, gRPC")
            out["concurrency"].append(concurrent(svc.address, prompts, concurrency_tokens))
            if n in http_client_counts:  # the same requests through Serve's HTTP proxy and the OpenAI API
                log(f"[served bench] {n} concurrent clients, HTTP (OpenAI completions)")
                out["concurrency"].append(concurrent(f"127.0.0.1:{svc.http_port}", prompts, concurrency_tokens, "HTTP"))
        return out
    finally:
        svc.shutdown()


def run(preset: str = "bench", workers: int = 2, prompt_tokens: int = 256, decode_batch: int = 8,
        decode_tokens: int = 16, repeats: int = 3, client_counts: tuple[int, ...] = (1, 8, 32),
        concurrency_tokens: int = 16, micro_batches: int | None = None) -> dict:
    log(f"[served bench] in-process reference on {preset!r}")
    ref = in_process(preset, prompt_tokens, decode_batch, decode_tokens, repeats)
    srv = served(preset, workers, prompt_tokens, decode_batch, decode_tokens, repeats, client_counts,
                 concurrency_tokens, micro_batches)
    L = ref["moe_layers"]
    return {
        "preset": preset, "workers": workers, "threads": torch.get_num_threads(), "in_process": ref, "served": srv,
        "micro_batches": micro_batches,
        "ratios": {"prefill": srv["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"],
                   "decode": srv["decode_tokens_per_s"] / ref["decode_tokens_per_s"]},
        # the headline: what serving adds to each MoE layer of a batch-1 step, end to end
        "layer_gap_s": (srv["batch1_step_s"] - ref["batch1_step_s"]) / L,
        "layer_gap_vs_echo": (srv["batch1_step_s"] - ref["batch1_step_s"]) / L / srv["echo_floor_s"],
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
        f"end-to-end gap per MoE layer at batch 1 (served - in-process step, over {ref['moe_layers']} MoE layers): "
        f"{r['layer_gap_s'] * 1e3:.2f} ms = {r['layer_gap_vs_echo']:.2f}x a streamed echo of one token's bytes to "
        f"{r['workers']} processes ({r['echo_floor_s'] * 1e3:.2f} ms, measured alternately)",
        "  where it goes, per MoE layer of a batch-1 decode step (in-process: hooks; served: the gateway's stage "
        "timers):",
        f"    attention        in-process {ref['batch1_s_per_layer']['attention'] * 1e3:6.2f} ms   served "
        f"{srv['batch1_stage_s_per_layer']['attention'] * 1e3:6.2f} ms",
        f"    routed experts   in-process {ref['batch1_s_per_layer']['routed'] * 1e3:6.2f} ms   served "
        + " + ".join(f"{k} {srv['batch1_stage_s_per_layer'][k] * 1e3:.2f}" for k in ("dispatch", "experts", "combine"))
        + f" ms (of the experts stage, the slowest worker computed {srv['batch1_worker_compute_s_per_layer'] * 1e3:.2f}"
        f" ms and the rest, the wire, was {srv['batch1_stage_s_per_layer']['wire'] * 1e3:.2f} ms)",
        "",
        f"{'api':>5}{'clients':>8}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}{'errors':>8}",
    ]
    for c in srv["concurrency"]:
        lines.append(f"{c.get('api', 'gRPC'):>5}{c['clients']:8d}{c['tokens_per_s']:10.1f}{c['ttft_p50_s'] * 1e3:9.0f}ms"
                     f"{c['ttft_p99_s'] * 1e3:9.0f}ms{c['itl_p50_s'] * 1e3:9.0f}ms{c['itl_p99_s'] * 1e3:9.0f}ms"
                     f"{c['errors']:8d}")
    conc = [c for c in srv["concurrency"] if c.get("api", "gRPC") == "gRPC"]
    if len(conc) >= 2:
        lines.append(f"{conc[-1]['clients']} vs {conc[0]['clients']} clients: "
                     f"{conc[-1]['tokens_per_s'] / conc[0]['tokens_per_s']:.1f}x tokens/s, "
                     f"p99 ITL {conc[-1]['itl_p99_s'] / max(conc[0]['itl_p99_s'], 1e-9):.2f}x")
    return "\n".join(lines)
