"""The paged latent cache, measured, before and after side by side in one run:

- concurrency at fixed memory: the KV bytes of 32 slots of 2048 positions (the cache before paging), prompts
  of 50-500 and outputs of 50-300 tokens; before, 32 sequences at most (one slot each); paged, as many as
  their blocks allow. The time-averaged count of sequences decoding (prefilling or preempted ones not
  counted), tiny model in process;
- prefix reuse: on `bench`, a 1,000-token system prompt; the time to first token of a hit beside a cold
  request of only the tokens a hit computes (the suffix and the system prompt's last partial block) and a
  cold full prompt, and the outputs with the cache on and off;
- preemption: a pool too small for its load finishes every request with an unconstrained run's tokens;
- affinity: the served service with two gateway replicas, 8 distinct 1,000-token system prompts, 64
  requests; the cache-aware router beside Serve's default router, each deployed in turn in this run: hits
  (usage.cached_tokens), each replica's share (from its /metrics), mean time to first token."""

from __future__ import annotations

import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from moe_service.bench.common import log, save_figure

SLOTS, SLOT_LEN = 32, 2048  # the cache before paging: max_running slots of max_seq_len positions
SYSTEM_LEN = 1000


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


def _run(engine, work: list, on_step=None) -> tuple[list[list[int]], int]:
    """Adds every (prompt, params), steps until done: (tokens of each, failed requests)."""
    outs: list[list[int]] = [[] for _ in work]
    failed = [0]

    def emit(i):
        def f(ev):
            if ev[0] == "token":
                outs[i].append(ev[1][0])
            elif ev[0] == "error":
                failed[0] += 1
        return f

    for i, (p, params) in enumerate(work):
        engine.add(p, params, emit(i))
    while engine.has_work:
        t0 = time.perf_counter()
        engine.step()
        if on_step:
            on_step(time.perf_counter() - t0)
    return outs, failed[0]


def concurrency(requests: int = 400, seed: int = 0) -> dict:
    from moe_service import load_model
    from moe_service.engine.engine import Engine
    from moe_service.engine.sampling import SamplingParams
    from moe_service.engine.scheduler import SchedulerConfig

    model = load_model("tiny")
    rng = random.Random(seed)
    work = [(_prompt(rng, rng.randint(50, 500), model.args.vocab_size),
             SamplingParams(max_new_tokens=rng.randint(50, 300), ignore_eos=True)) for _ in range(requests)]
    kv = SLOTS * SLOT_LEN
    rows = []
    for label, max_running in (("slots (before)", SLOTS), ("paged", requests)):
        cfg = SchedulerConfig(max_running=max_running, max_seq_len=SLOT_LEN, kv_capacity_tokens=kv, max_queue=requests)
        engine = Engine(model, config=cfg)
        weighted, total, peak = [0.0], [0.0], [0]

        def on_step(dt, sched=engine.scheduler):
            decoding = sum(1 for s in sched.running if not s.in_prefill)
            weighted[0] += decoding * dt
            total[0] += dt
            peak[0] = max(peak[0], decoding)

        log(f"[cache bench] concurrency, {label}: {requests} requests, KV {kv} tokens")
        t0 = time.perf_counter()
        outs, failed = _run(engine, work, on_step)
        seconds = time.perf_counter() - t0
        stats = engine.stats()
        rows.append({"cache": label, "max_running": max_running, "kv_capacity_tokens": cfg.capacity,
                     "mean_decoding": weighted[0] / total[0], "peak_decoding": peak[0], "failed": failed,
                     "finished": sum(len(o) == p.max_new_tokens for o, (_, p) in zip(outs, work)),
                     "preemptions": stats["preemptions"], "seconds": seconds,
                     "tokens_per_s": sum(map(len, outs)) / seconds})
        engine.close()
    return {"requests": requests, "kv_tokens": kv, "rows": rows,
            "ratio": rows[1]["mean_decoding"] / rows[0]["mean_decoding"]}


def _ttft(engine, prompt: list[int], params) -> tuple[float, list[int]]:
    """Seconds from add() to the first token, and the whole output, stepping alone."""
    first, out = [None], []
    t0 = time.perf_counter()

    def emit(ev):
        if ev[0] == "token":
            out.append(ev[1][0])
            if first[0] is None:
                first[0] = time.perf_counter() - t0

    engine.add(prompt, params, emit)
    while engine.has_work:
        engine.step()
    return first[0], out


class ExpertsTouched:
    """Distinct routed experts per MoE layer call of a request's prefill: on a CPU the experts' time follows the weights
    they read, so a hit whose tokens route more widely than the same tokens alone costs more for that alone."""

    def __init__(self, model) -> None:
        from moe_service.model.gate import Gate

        self.layers = len(model.args.moe_layers)  # the first step's calls: the prefill's
        self.counts: list[int] = []
        for mod in model.modules():
            if isinstance(mod, Gate):
                mod.register_forward_hook(lambda mod, inp, out: self.counts.append(len(torch.unique(out[1]))))

    def mean(self, fn) -> tuple[object, float]:
        self.counts.clear()
        out = fn()
        first = self.counts[: self.layers]
        return out, sum(first) / max(len(first), 1)


def prefix_reuse(preset: str = "bench", suffix: int = 32, repeats: int = 5, seed: int = 1) -> dict:
    from moe_service import load_model
    from moe_service.engine.engine import Engine
    from moe_service.engine.sampling import SamplingParams
    from moe_service.engine.scheduler import SchedulerConfig
    from moe_service.model.cache import BLOCK_SIZE

    model = load_model(preset)
    rng = random.Random(seed)
    system = _prompt(rng, SYSTEM_LEN, model.args.vocab_size)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    cfg = dict(max_running=4, max_seq_len=2048, prefill_chunk=2048, step_token_budget=2048)
    on, off = Engine(model, config=SchedulerConfig(**cfg)), Engine(model, config=SchedulerConfig(**cfg, prefix_caching=False))
    log(f"[cache bench] prefix reuse on {preset}: {SYSTEM_LEN}-token system prompt, cold")
    cold_full, _ = _ttft(on, system + [rng.randrange(3, 500) for _ in range(suffix)], params)
    hits, suffix_only, same, touched = [], [], True, ([], [])
    experts = ExpertsTouched(model)
    cached = SYSTEM_LEN // BLOCK_SIZE * BLOCK_SIZE  # the system prompt's full blocks
    for i in range(repeats):  # alternating, so that a slower moment weighs on both
        tail = [rng.randrange(3, model.args.vocab_size) for _ in range(suffix)]
        log(f"[cache bench] prefix reuse: hit and suffix alone, round {i + 1}/{repeats}")
        (t_hit, out_hit), e_hit = experts.mean(lambda: _ttft(on, system + tail, params))
        (t_suffix, _), e_suffix = experts.mean(lambda: _ttft(off, (system + tail)[cached:], params))  # a hit's tokens, cold
        touched[0].append(e_hit), touched[1].append(e_suffix)
        _, out_off = _ttft(off, system + tail, params)
        hits.append(t_hit)
        suffix_only.append(t_suffix)
        same &= out_hit == out_off
    hit_tokens = on.stats()["prefix_hit_tokens"]
    on.close(), off.close()
    return {"preset": preset, "system_tokens": SYSTEM_LEN, "suffix_tokens": suffix, "cached_tokens": cached,
            "uncached_tokens": SYSTEM_LEN + suffix - cached, "cold_full_ttft_s": cold_full,
            "hit_ttft_s": statistics.median(hits), "suffix_only_ttft_s": statistics.median(suffix_only),
            "hit_vs_suffix": statistics.median(hits) / statistics.median(suffix_only),
            "hit_tokens": hit_tokens, "outputs_equal_cache_off": same,
            "experts_per_layer_hit": statistics.mean(touched[0]), "experts_per_layer_suffix": statistics.mean(touched[1]),
            "experts": model.args.n_routed_experts}


def preemption(requests: int = 24, seed: int = 2) -> dict:
    from moe_service import load_model
    from moe_service.engine.engine import Engine
    from moe_service.engine.sampling import SamplingParams
    from moe_service.engine.scheduler import SchedulerConfig

    model = load_model("tiny")
    rng = random.Random(seed)
    work = [(_prompt(rng, rng.randint(20, 120), model.args.vocab_size),
             SamplingParams(max_new_tokens=rng.randint(20, 120), ignore_eos=True)) for _ in range(requests)]
    log(f"[cache bench] preemption: {requests} requests in a pool of 512 tokens, and unconstrained")
    small = Engine(model, config=SchedulerConfig(max_running=requests, max_seq_len=256, kv_capacity_tokens=512))
    big = Engine(model, config=SchedulerConfig(max_running=requests, max_seq_len=256))
    (got, failed), (want, _) = _run(small, work), _run(big, work)
    pre = small.stats()["preemptions"]
    small.close(), big.close()
    return {"requests": requests, "kv_capacity_tokens": 512, "preemptions": pre, "failed": failed,
            "same_tokens": got == want}


# ---- affinity, served --------------------------------------------------------------------------------


def _replica_requests(svc) -> dict[str, float]:
    """Generate calls answered OK by each gateway replica, from its own /metrics."""
    import json
    import urllib.request

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    sd = ray.get(svc.controller().http_address.remote())
    out = {}
    for t in json.load(urllib.request.urlopen(f"http://{sd}/targets", timeout=10)):
        if t["labels"].get("component") != "gateway":
            continue
        text = urllib.request.urlopen(f"http://{t['targets'][0]}/metrics", timeout=10).read().decode()
        n = sum(s.value for f in text_string_to_metric_families(text) if f.name == "moe_requests"
                for s in f.samples if s.name == "moe_requests_total" and s.labels.get("method") == "Generate")
        out[t["labels"]["replica"]] = n
    return out


def _affinity_once(router: bool, prompts: list[list[int]], order: list[int], seed: int) -> dict:
    from moe_service.bench.common import local_service
    from moe_service.client import Client
    from moe_service.serving.local import start_service

    svc = start_service(local_service(model="tiny", workers=1, gateway_replicas=2, cache_aware_routing=router,
                                      http_api=False, gateway_torch_threads=1, load_report_interval_s=0.5,
                                      scheduler={"max_running": 16, "max_seq_len": 2048}))
    rng = random.Random(seed)
    try:
        with Client(svc.address) as c:
            def one(i: int) -> dict:
                tail = [rng.randrange(3, 500) for _ in range(8)]
                return list(c.generate(token_ids=prompts[i] + tail, max_new_tokens=4, ignore_eos=True))[-1].usage

            for i in range(len(prompts)):  # one warm-up request per prompt
                one(i)
            with ThreadPoolExecutor(4) as pool:
                usages = list(pool.map(one, order))
            while len(served := _replica_requests(svc)) < 2:  # until both have reported their metrics address
                time.sleep(0.2)
    finally:
        svc.shutdown()
    served = sorted(served.values())  # all requests, warm-ups included
    hits = sum(u["cached_tokens"] >= SYSTEM_LEN - 16 for u in usages)
    return {"router": "cache-aware" if router else "Serve default (power of two)", "requests": len(order),
            "all_requests": len(order) + len(prompts),
            "hits": hits, "hit_rate": hits / len(order), "per_replica": served,
            "max_share": max(served) / max(sum(served), 1),
            "mean_ttft_s": statistics.mean(u["time_to_first_token_s"] for u in usages)}


def affinity(prompts: int = 8, requests: int = 64, seed: int = 3) -> dict:
    import ray

    if not ray.is_initialized():
        from moe_service.serving.proxy_limits import RUNTIME_ENV

        ray.init(num_cpus=2, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                 runtime_env=RUNTIME_ENV)
    rng = random.Random(seed)
    systems = [_prompt(rng, SYSTEM_LEN, 512) for _ in range(prompts)]
    order = [i % prompts for i in range(requests - prompts)]
    rng.shuffle(order)
    rows = []
    for router in (True, False):
        log(f"[cache bench] affinity: {'cache-aware router' if router else 'Serve default router'}, "
            f"2 gateway replicas, {prompts} prompts, {requests} requests")
        rows.append(_affinity_once(router, systems, order, seed))
    return {"prompts": prompts, "system_tokens": SYSTEM_LEN, "rows": rows}


def run(out_dir: str = "bench-results", parts: tuple[str, ...] = ("concurrency", "prefix", "preemption", "affinity"),
        preset: str = "bench") -> dict:
    r: dict = {}
    if "concurrency" in parts:
        r["concurrency"] = concurrency()
    if "prefix" in parts:
        r["prefix"] = prefix_reuse(preset)
    if "preemption" in parts:
        r["preemption"] = preemption()
    if "affinity" in parts:
        r["affinity"] = affinity()
    if "concurrency" in r:
        r["plot"] = plot(r, out_dir)
    return r


def plot(r: dict, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["concurrency"]["rows"]
    fig, axes = plt.subplots(1, 2 if "affinity" in r else 1, figsize=(9 if "affinity" in r else 5, 3.4), squeeze=False)
    ax = axes[0][0]
    ax.bar([row["cache"] for row in rows], [row["mean_decoding"] for row in rows], color=["#999", "#3a7"])
    ax.set_ylabel("sequences decoding (time-averaged)")
    ax.set_title(f"same KV bytes ({r['concurrency']['kv_tokens']} tokens)", fontsize=9)
    if "affinity" in r:
        ax = axes[0][1]
        aff = r["affinity"]["rows"]
        ax.bar([row["router"].split(" (")[0] for row in aff], [row["hit_rate"] * 100 for row in aff], color=["#3a7", "#999"])
        ax.set_ylabel("prefix hits (% of requests)")
        ax.set_ylim(0, 100)
        ax.set_title("2 gateway replicas, 8 system prompts", fontsize=9)
    fig.suptitle("paged latent cache (measured, CPU)", fontsize=10)
    return save_figure(fig, out_dir, "cache.png")


def format_results(r: dict) -> str:
    lines = []
    if "concurrency" in r:
        c = r["concurrency"]
        lines.append(f"concurrency at fixed memory ({c['kv_tokens']} KV tokens, {c['requests']} requests, prompts 50-500, "
                     f"outputs 50-300, tiny):")
        lines.append(f"{'cache':>16}{'max_run':>9}{'decoding':>10}{'peak':>6}{'preempt':>9}{'failed':>8}{'tok/s':>8}")
        for row in c["rows"]:
            lines.append(f"{row['cache']:>16}{row['max_running']:>9}{row['mean_decoding']:>10.1f}{row['peak_decoding']:>6}"
                         f"{row['preemptions']:>9}{row['failed']:>8}{row['tokens_per_s']:>8.0f}")
        lines.append(f"  paged / slots: {c['ratio']:.1f}x sequences decoding")
    if "prefix" in r:
        p = r["prefix"]
        lines.append(f"prefix reuse ({p['preset']}, {p['system_tokens']}-token system prompt + {p['suffix_tokens']}): "
                     f"TTFT cold full {p['cold_full_ttft_s'] * 1e3:.0f} ms, hit {p['hit_ttft_s'] * 1e3:.0f} ms, "
                     f"its {p['uncached_tokens']} uncached tokens alone {p['suffix_only_ttft_s'] * 1e3:.0f} ms: hit/suffix {p['hit_vs_suffix']:.2f}x; "
                     f"outputs equal with the cache off: {p['outputs_equal_cache_off']}; distinct experts per MoE layer call: "
                     f"hit {p['experts_per_layer_hit']:.1f}, uncached tokens alone {p['experts_per_layer_suffix']:.1f} "
                     f"of {p['experts']}")
    if "preemption" in r:
        p = r["preemption"]
        lines.append(f"preemption: {p['requests']} requests in {p['kv_capacity_tokens']} KV tokens: {p['preemptions']} "
                     f"preemptions, {p['failed']} failed, same tokens as unconstrained: {p['same_tokens']}")
    if "affinity" in r:
        lines.append(f"affinity (2 gateway replicas, {r['affinity']['prompts']} system prompts of "
                     f"{r['affinity']['system_tokens']} tokens, after one warm-up each):")
        for row in r["affinity"]["rows"]:
            lines.append(f"  {row['router']:>30}: hits {row['hits']}/{row['requests']} ({row['hit_rate']:.0%}), "
                         f"of {row['all_requests']} per replica {[int(n) for n in row['per_replica']]} (max share {row['max_share']:.0%}), "
                         f"mean TTFT {row['mean_ttft_s'] * 1e3:.1f} ms")
    return "\n".join(lines) + (f"\nplot: {r['plot']}" if r.get("plot") else "")
