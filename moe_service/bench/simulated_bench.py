"""A live SIMULATED cluster against `moe-service simulate`: 8 expert workers that hold their answers to the
cost model's time for a named device and expert shape (serving/simulated.py), the real gateway, gRPC and
controller, decode streams routed by a Zipf trace; the gateway's expert stage before and after a live
rebalance, divided by the time dilation, beside what `simulate` predicts for the same placements. Every
time printed here is SIMULATED; the tokens and failures are real."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from moe_service.bench.common import local_service, log
from moe_service.bench.served_bench import _gateway_metrics


def _placement_of(table: dict, layers: list[int], experts: int, workers: int):
    """The routing table the controller published, as a Placement (hosts and token shares)."""
    from moe_service.placement import Placement

    hosts = np.zeros((len(layers), experts, workers), dtype=bool)
    fractions = np.zeros(hosts.shape)
    routes = {int(layer): r for layer, r in table["routes"].items()}
    for i, layer in enumerate(layers):
        r = routes[layer]
        for e, (reps, shares) in enumerate(zip(r["replicas"], r["shares"])):
            hosts[i, e, reps] = True
            fractions[i, e, reps] = shares
    fractions /= fractions.sum(axis=2, keepdims=True)
    return Placement(hosts=hosts, fractions=fractions, replicas_per_worker=int(hosts.sum(axis=1).max()))


def _streams(address: str, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[str]]:
    from moe_service.client import Client

    outs: list[list[int]] = [[] for _ in prompts]
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            with Client(address) as c:
                outs[i] = c.generate_ids(prompts[i], max_new_tokens=new_tokens, ignore_eos=True)
        except Exception as e:  # counted: the bench reports failed requests
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs, errors


def run(workers: int = 8, streams: int = 64, new_tokens: int = 8, device: str = "H200",
        shape: str = "DeepSeek-V2-Lite", zipf: float = 1.2, time_scale: float = 1000.0, prefill_tokens: int = 0,
        requests: int = 3, objective: str = "time") -> dict:
    """Decode: `streams` one-token prompts generating `new_tokens` each, every layer call routes the streams.
    `prefill_tokens` > 0: instead `requests` prompts of that many tokens one after another, one token each, so
    every layer call routes `prefill_tokens` tokens (compute-bound on an H200 from a few thousand). The
    controller rebalances by `objective` ("time": for layer calls of this size), whatever the gain."""
    import ray

    from moe_service.capacity.costmodel import device as named_device
    from moe_service.serving.local import start_service
    from moe_service.serving.simulated import Simulation
    from moe_service.capacity.simulate import Cluster
    from moe_service.cli.views import fetch

    if not ray.is_initialized():
        from moe_service.serving.proxy_limits import RUNTIME_ENV

        ray.init(num_cpus=2, num_gpus=workers, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                 runtime_env=RUNTIME_ENV)
    sim = Simulation(device=device, shape=shape, time_scale=time_scale, routing=f"zipf:{zipf}")
    rng = np.random.default_rng(0)
    if prefill_tokens:
        tokens_per_call, new_tokens = prefill_tokens, 1
        # the same prompts in every phase (their tokens are compared), each prefilled whole: no prefix cache
        scheduler = {"max_running": 1, "micro_batches": 1, "max_seq_len": prefill_tokens + 8,
                     "prefill_chunk": prefill_tokens, "step_token_budget": prefill_tokens, "prefix_caching": False}
        prompts = [[int(t) for t in rng.integers(3, 512, prefill_tokens)] for _ in range(requests)]
    else:
        tokens_per_call = streams
        scheduler = {"max_running": streams, "micro_batches": 1, "max_seq_len": new_tokens + 8}
        # one token of prompt each: a step's rows are the streams, in prefill as in decode
        prompts = [[int(t)] for t in rng.integers(3, 512, streams)]
    cfg = local_service(model="tiny-64", workers=workers, simulate=sim.to_dict(), load_report_interval_s=0.5,
                        scheduler=scheduler, rebalance_objective=objective, rebalance_batch=tokens_per_call,
                        rebalance_min_gain=0.0)
    log(f"[simulated bench] starting {workers} SIMULATED {device} workers ({shape} experts, x{time_scale:g} time)")
    svc = start_service(cfg)
    try:
        from moe_service import load_model

        args = load_model("tiny-64", with_routed_experts=False).args
        layers = args.moe_layers
        trace = sim.trace(args)
        cluster = Cluster(sim.args(), named_device(device), 1, workers, tokens_per_call)
        http = ray.get(svc.controller().http_address.remote())

        def measure(label: str) -> dict:
            m0 = _gateway_metrics(svc)
            if prefill_tokens:
                log(f"[simulated bench] {label}: {requests} prompts of {prefill_tokens} tokens, one after another")
                outs, errors = [], []
                for prompt in prompts:
                    o, e = _streams(svc.address, [prompt], 1)
                    outs, errors = outs + o, errors + e
            else:
                log(f"[simulated bench] {label}: {streams} streams x {new_tokens} tokens")
                outs, errors = _streams(svc.address, prompts, new_tokens)
            m1 = _gateway_metrics(svc)
            # one observation per step, summed over its MoE layers: a step of one micro-batch calls each layer once
            calls = (m1["countexperts"] - m0.get("countexperts", 0.0)) * len(layers)
            live = (m1["sumexperts"] - m0.get("sumexperts", 0.0)) / calls / time_scale
            placement = _placement_of(ray.get(svc.controller().table.remote()), layers, args.n_routed_experts,
                                      workers)
            step = cluster.step(trace.load(args.num_experts_per_tok), placement)
            return {"outputs": outs, "errors": errors, "live_s": live, "predicted_s": step["expert_stage_s_per_layer"],
                    "floor_s": step["expert_floor_s_per_layer"], "replicas": int(placement.replica_counts().sum())}

        measure("warm-up")
        before = measure("before rebalancing")
        reb = fetch(http, "/rebalance", method="POST")
        after = measure("after rebalancing")
    finally:
        svc.shutdown()
    # how much the trace's draw matters (which hot experts round robin happens to put together): `simulate`'s
    # before/after for other seeds of the same Zipf trace
    spread = []
    for seed in range(20):
        load = dataclasses.replace(sim, seed=seed).trace(args).load(args.num_experts_per_tok)
        before_s, after_s = (cluster.step(load, cluster.placement(load, p))["expert_stage_s_per_layer"]
                             for p in ("round-robin", objective))
        spread.append(before_s / after_s)
    return {"simulated": True, "device": device, "shape": shape, "workers": workers, "streams": streams,
            "seed_spread": spread,
            "prefill_tokens": prefill_tokens, "tokens_per_call": tokens_per_call, "zipf": zipf, "time_scale": time_scale,
            "objective": objective, "before": before, "after": after, "moves": reb.get("moves"),
            "tokens_unchanged": before["outputs"] == after["outputs"],
            "failed": len(before["errors"]) + len(after["errors"])}


def run_phases(workers: int = 8) -> dict:
    """What docs/scaling.md reports: 64 decode streams (memory-bound on an H200: the floor leaves a rebalance
    little to gain) and prompts of 4000 tokens (compute-bound: a rebalance pays), a service each."""
    return {"phases": [run(workers=workers), run(workers=workers, prefill_tokens=4000)]}


def format_results(r: dict) -> str:
    if "phases" in r:
        return "\n\n".join(format_results(p) for p in r["phases"])
    work = (f"prompts of {r['prefill_tokens']} tokens (prefill)" if r["prefill_tokens"] else
            f"{r['streams']} decode streams")
    lines = [f"SIMULATED: {r['workers']} {r['device']} workers with {r['shape']} experts (time x{r['time_scale']:g}, "
             f"divided back), {work}, Zipf {r['zipf']} routing; real gateway, gRPC, controller (rebalancing by "
             f"{r['objective']})",
             f"{'':22}{'live (simulated)':>18}{'simulate':>11}{'live/simulate':>15}{'replicas':>10}"]
    for name in ("before", "after"):
        d = r[name]
        lines.append(f"{name + ' rebalancing':22}{d['live_s'] * 1e6:15.1f} us{d['predicted_s'] * 1e6:8.1f} us"
                     f"{d['live_s'] / d['predicted_s']:14.2f}x{d['replicas']:10d}")
    lines.append(f"expert stage after vs before: {r['before']['live_s'] / r['after']['live_s']:.2f}x lower (live), "
                 f"{r['before']['predicted_s'] / r['after']['predicted_s']:.2f}x (simulate); rebalance moved "
                 f"{r['moves']} replicas; failed requests {r['failed']}; tokens unchanged: {r['tokens_unchanged']}")
    spread = np.array(r["seed_spread"])
    lines.append(f"simulate over {len(spread)} seeds of the trace: after vs before median {np.median(spread):.2f}x, "
                 f"range {spread.min():.2f}-{spread.max():.2f}x, >= 1.5x in {(spread >= 1.5).sum()} (this run: seed 0)")
    floor = r["before"]["floor_s"]
    lines.append(f"floor: no placement's expert stage is predicted below {floor * 1e6:.1f} us per layer here, so no "
                 f"rebalance can lower it more than {r['before']['predicted_s'] / floor:.2f}x (simulate)")
    return "\n".join(lines)
