"""The served path against the in-process model, in one run: prefill and decode throughput, the
per-MoE-layer dispatch overhead at batch 1, and tokens/s and latency percentiles under 1/8/32 clients."""

from __future__ import annotations

import statistics
import threading
import time

import torch

from moe_service.bench.common import log
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
            "decode_tokens_per_s": len(gaps) / decode_window if len(prompts) > 1 else 1 / statistics.mean(gaps),
            "ttft_p50_s": q(ttfts, 50), "ttft_p99_s": q(ttfts, 99), "itl_p50_s": q(gaps, 50), "itl_p99_s": q(gaps, 99)}


def _gateway_metrics(svc) -> dict[str, float]:
    """Stage sums and worker compute from the gateway's own /metrics (found through the controller)."""
    import json
    import re
    import urllib.request

    import ray

    http = ray.get(svc.controller().http_address.remote())
    targets = json.load(urllib.request.urlopen(f"http://{http}/targets"))
    gw = next(t["targets"][0] for t in targets if t["labels"].get("component") == "gateway")
    text = urllib.request.urlopen(f"http://{gw}/metrics").read().decode()
    out = {m.group(1): float(m.group(2)) for m in
           re.finditer(r'moe_step_stage_seconds_sum\{stage="(\w+)"\} ([\d.e+-]+)', text)}
    compute = [float(m.group(1)) for m in re.finditer(r'moe_expert_compute_seconds_sum\{worker="\d+"\} ([\d.e+-]+)', text)]
    out["compute_max"] = max(compute, default=0.0)
    calls = [float(m.group(1)) for m in re.finditer(r'moe_moe_layer_tokens_total\{layer="\d+"\} ([\d.e+-]+)', text)]
    out["moe_moe_layer_calls"] = sum(calls)  # at batch 1, one token per layer call
    return out


def served(preset: str, workers: int, prompt_tokens: int, decode_batch: int, decode_tokens: int, repeats: int,
           client_counts: tuple[int, ...], concurrency_tokens: int) -> dict:
    import ray

    from moe_service.client import Client
    from moe_service.serving.local import start_service

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=workers, include_dashboard=False, namespace="moe_service", log_to_driver=False)
    max_running = max(max(client_counts), decode_batch)
    cfg = dict(model=preset, workers=workers, gpus_per_worker=1.0, gateway_num_cpus=0, expert_bind_host="127.0.0.1",
               # the gateway's attention and the workers' experts alternate within a step, so the
               # gateway may use both cores while one worker thread each keeps the experts in parallel
               gateway_torch_threads=2,
               sd_port=0, rebalance_interval_s=0,
               scheduler={"max_running": max_running, "max_seq_len": prompt_tokens + 64, "prefill_chunk": prompt_tokens,
                          "step_token_budget": 128})
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
            before = _gateway_metrics(svc)
            gaps = []
            for _ in range(repeats):
                gaps.extend(_stream(c, short[0], decode_tokens)[1])
            after = _gateway_metrics(svc)
        log(f"[served bench] decode, batch {decode_batch}")
        dec = concurrent(svc.address, short, decode_tokens)
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        layer_calls = d.get("moe_moe_layer_calls", 0.0) or 1.0
        # the wire's own cost per MoE layer: planning, the RPC round trip beyond the workers' compute
        # (the slower of the concurrent calls), and combining
        overhead = (d.get("dispatch", 0) + d.get("combine", 0) + d.get("experts", 0) - d.get("compute_max", 0)) / layer_calls
        out = {"prefill_tokens_per_s": prompt_tokens / prefill, "decode_tokens_per_s": dec["decode_tokens_per_s"],
               "batch1_step_s": statistics.median(gaps), "dispatch_overhead_per_layer_s": overhead,
               "batch1_stage_s_per_layer": {k: d.get(k, 0) / layer_calls for k in ("dispatch", "experts", "combine")},
               "batch1_worker_compute_s_per_layer": d.get("compute_max", 0) / layer_calls, "concurrency": []}
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
        f"(plan + RPC beyond the workers' compute + combine; workers computed "
        f"{srv['batch1_worker_compute_s_per_layer'] * 1e3:.2f} ms per layer)",
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
