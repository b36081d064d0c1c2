"""Hot experts: per-worker load and throughput before and after a rebalance, on a skewed preset
(routing concentrated on a few experts per layer), printed and drawn as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_service.bench.common import local_service, log
from moe_service.bench.served_bench import _gateway_metrics, _prompts, concurrent


def _text_prompts(preset: str, n: int, length: int) -> list[list[int]] | None:
    """For the trained model: windows of its held-out files, so routing is its own natural skew (None for a
    preset of random weights, whose skew is made by scaling gate rows)."""
    if preset != "coder":
        return None
    from moe_service.coder.specialisation import held_out_sample
    from moe_service.engine.tokenizer import load_tokenizer
    from moe_service.checkpoint import open_source

    ids = load_tokenizer(preset, open_source(preset).args).encode(held_out_sample(200_000))
    step = max(1, (len(ids) - length) // n)
    return [ids[i * step : i * step + length] for i in range(n)]


def run(preset: str = "bench-skewed", workers: int = 2, clients: int = 8, prompt_tokens: int = 256,
        new_tokens: int = 4, rounds: int = 3, out_dir: str | Path = "bench-results", spare_replicas: bool = True) -> dict:
    """Throughput is prompt plus generated tokens per second on a prefill-heavy workload: there every
    routed token costs its share of the expert FLOPs, which is what balancing routed tokens evens out.
    (A decode step of a few sequences costs a worker the expert weights it reads, whatever the token
    count: docs/performance.md.) `spare_replicas=False` gives each worker exactly its share of the
    experts, so a rebalance can only move experts, never replicate them."""
    import ray

    from moe_service.checkpoint import open_source
    from moe_service.cli.views import fetch
    from moe_service.serving.local import start_service

    if not ray.is_initialized():
        from moe_service.serving.proxy_limits import RUNTIME_ENV

        ray.init(num_cpus=2, num_gpus=workers, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                 runtime_env=RUNTIME_ENV)
    args = open_source(preset).args
    cfg = local_service(model=preset, workers=workers, load_report_interval_s=0.5, load_window_s=600,
                        # one prefill step takes every prompt (vLLM's max_num_batched_tokens is of this order)
                        scheduler={"max_running": clients, "max_seq_len": prompt_tokens + new_tokens,
                                   "step_token_budget": clients * prompt_tokens, "prefill_chunk": prompt_tokens})
    if not spare_replicas:
        cfg["replicas_per_worker"] = -(-args.n_routed_experts // workers)
    log(f"[skewed bench] starting the service: {workers} workers, preset {preset!r}")
    svc = start_service(cfg)
    try:
        http = ray.get(svc.controller().http_address.remote())
        prompts = _text_prompts(preset, clients, prompt_tokens) or _prompts(clients, prompt_tokens, args.vocab_size,
                                                                             seed=7)
        processed = clients * (prompt_tokens + new_tokens)

        def measure(label: str, n: int) -> tuple[list[float], list[float]]:
            """Processed tokens/s and seconds in the gateway's expert stage, per round."""
            rates, stage = [], []
            for i in range(n):
                log(f"[skewed bench] {label}: round {i + 1}/{n}, {clients} clients x "
                    f"({prompt_tokens} prompt + {new_tokens} new) tokens")
                m0 = _gateway_metrics(svc)
                r = concurrent(svc.address, prompts, new_tokens)
                m1 = _gateway_metrics(svc)
                if r["errors"]:
                    raise RuntimeError(f"{r['errors']} requests failed during the skewed bench")
                rates.append(processed / r["wall_s"])
                stage.append(m1["sumexperts"] - m0.get("sumexperts", 0.0))
            return rates, stage

        measure("warm-up", 1)  # first-touch page faults and allocator growth would count against "before"
        before_rates, before_stage = measure("before rebalancing", rounds)
        before = fetch(http, "/stats")
        log("[skewed bench] rebalancing")
        reb = fetch(http, "/rebalance", method="POST")
        measure("warm-up after rebalancing", 1)  # the same for the new replicas' pages
        after_rates, after_stage = measure("after rebalancing", rounds)
        after = fetch(http, "/stats")
        load = np.array(ray.get(svc.controller().window_load.remote()))
    finally:
        svc.shutdown()
    before_tps, after_tps = float(np.median(before_rates)), float(np.median(after_rates))
    result = {
        "preset": preset, "workers": workers, "clients": clients, "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "rounds_before": before_rates, "rounds_after": after_rates,
        "tokens_per_s_before": before_tps, "tokens_per_s_after": after_tps, "speedup": after_tps / before_tps,
        "expert_stage_s_before": float(np.median(before_stage)), "expert_stage_s_after": float(np.median(after_stage)),
        "worker_load_before": before["worker_load"], "worker_load_after": after["worker_load"],
        "balancedness_before": reb["balancedness_before"], "balancedness_after": reb["balancedness_after"],
        "moves": reb["moves"], "rebalance_seconds": reb.get("seconds"),
    }
    result["plot"] = str(plot(result, load, Path(out_dir) / "skewed.png"))
    return result


def plot(r: dict, load: np.ndarray, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    W = len(r["worker_load_before"])
    x = np.arange(W)
    tot_b, tot_a = sum(r["worker_load_before"]) or 1, sum(r["worker_load_after"]) or 1
    a.bar(x - 0.2, np.array(r["worker_load_before"]) / tot_b, 0.4, label=f"before ({r['tokens_per_s_before']:.1f} tok/s)")
    a.bar(x + 0.2, np.array(r["worker_load_after"]) / tot_a, 0.4, label=f"after ({r['tokens_per_s_after']:.1f} tok/s)")
    a.axhline(1 / W, color="gray", ls="--", lw=1, label="even share")
    a.set_xticks(x, [f"worker {w}" for w in range(W)])
    a.set_ylabel("share of routed tokens")
    a.set_title(f"per-worker load, {r['speedup']:.2f}x throughput after rebalancing")
    a.legend(fontsize=8)
    im = b.imshow(load, aspect="auto", cmap="viridis")
    b.set_xlabel("expert")
    b.set_ylabel("MoE layer")
    b.set_title("routed tokens per (layer, expert)")
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_results(r: dict) -> str:
    fmt = lambda xs: " ".join(f"{v / (sum(xs) or 1):.2f}" for v in xs)  # noqa: E731
    return "\n".join([
        f"preset {r['preset']}, {r['workers']} workers, {r['clients']} clients",
        f"per-worker share of load  before: {fmt(r['worker_load_before'])}   after: {fmt(r['worker_load_after'])}",
        f"balancedness (mean over layers) {np.mean(r['balancedness_before']):.3f} -> "
        f"{np.mean(r['balancedness_after']):.3f}, {r['moves']} replica moves",
        f"processed tokens/s ({r['clients']} clients x {r['prompt_tokens']} prompt + {r['new_tokens']} new), median of "
        f"{len(r['rounds_before'])} rounds: before {r['tokens_per_s_before']:.1f}, after {r['tokens_per_s_after']:.1f}: "
        f"{r['speedup']:.2f}x",
        f"gateway's expert stage per round (the slowest worker sets it): {r['expert_stage_s_before']:.2f} s -> "
        f"{r['expert_stage_s_after']:.2f} s, {r['expert_stage_s_before'] / r['expert_stage_s_after']:.2f}x",
        f"rounds before: {' '.join(f'{v:.1f}' for v in r['rounds_before'])}   "
        f"after: {' '.join(f'{v:.1f}' for v in r['rounds_after'])}",
        f"plot: {r['plot']}",
    ])
