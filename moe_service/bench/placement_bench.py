"""Time-aware against token-balanced placement, measured on this CPU, and the cost model checked against the
same measurements.

`calibrate()` measures this CPU's parameters for the cost model with the expert kernel at the expert shape
(one row through many experts for bandwidth, many rows through one for FLOP/s, the smallest routed-experts
call for the fixed cost), one thread as a worker computes here. The validation below routes real batches
over real placements: other row counts, experts per worker and groupings than the calibration saw.

`run()` then takes the `bench` preset's expert shape, Zipf routing over its experts, and for each batch
size plans both placements for 4 workers, routes a real batch through each, and times every worker's share
of the layer one worker at a time, in isolation (real matmuls over real weights, not the model). The
busiest worker's time is the layer's; the cost model's prediction for each worker is printed beside it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import torch

from moe_service.bench.common import log, timeit
from moe_service.costmodel import CALIBRATION_FILE, Device, worker_cost


def calibrate(threads: int = 1, dim: int = 1024, inter: int = 704, path: Path = CALIBRATION_FILE) -> Device:
    """This CPU as a cost-model device (fp32, `threads` threads), written to `path`, measured with the call a
    worker makes (RoutedExperts) at the `bench` preset's expert shape:
    - bandwidth: 48 experts (far more bytes than the caches hold), one row each: weight reads dominate;
    - multi-row bandwidth: the same with two rows each (a small GEMM, not a GEMV);
    - FLOP/s: one expert over 2048 rows: compute dominates;
    - the fixed cost: the smallest call, one row through one tiny expert."""
    from moe_service.model.experts import RoutedExperts

    torch.set_num_threads(threads)
    n = 48
    many = RoutedExperts(n, dim, inter)
    torch.nn.init.normal_(many.gate_up_proj, std=0.02)
    torch.nn.init.normal_(many.down_proj, std=0.02)
    # one row per expert: every expert's weights read once for one pair each
    x, w, e = torch.randn(n, dim), torch.full((n, 1), 0.1), torch.arange(n)[:, None]
    bandwidth = n * 3 * dim * inter * 4 / timeit(lambda: many(x, w, e), 5)
    # two rows per expert: what BLAS does for a small GEMM instead of a GEMV (packing the weights)
    x2, w2, e2 = torch.randn(2 * n, dim), torch.full((2 * n, 1), 0.1), torch.arange(n).repeat_interleave(2)[:, None]
    multi_row = n * 3 * dim * inter * 4 / timeit(lambda: many(x2, w2, e2), 5)
    one = RoutedExperts(1, dim, inter)
    one.gate_up_proj.data.copy_(many.gate_up_proj.data[:1])
    one.down_proj.data.copy_(many.down_proj.data[:1])
    rows, w1, e1 = torch.randn(2048, dim), torch.full((2048, 1), 0.1), torch.zeros(2048, 1, dtype=torch.long)
    flops = 2 * 2048 * 3 * dim * inter / timeit(lambda: one(rows, w1, e1), 5)
    tiny = RoutedExperts(1, 8, 8)
    torch.nn.init.normal_(tiny.gate_up_proj)
    torch.nn.init.normal_(tiny.down_proj)
    xs, wt, ex = torch.randn(1, 8), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long)
    call_s = timeit(lambda: tiny(xs, wt, ex), 200)
    dev = Device(f"this CPU ({threads} thread{'s' * (threads > 1)}, fp32)", bandwidth, flops,
                 f"moe-service calibrate: routed experts {dim}x{inter}, 1 row to each of {n} experts (bandwidth), "
                 "2 rows to each (multi-row bandwidth), 2048 rows through one (FLOP/s), a 1-row call of a tiny expert "
                 "(fixed cost)", itemsize=4, call_s=call_s, multi_row_bandwidth=multi_row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": dev.name, "memory_bandwidth": bandwidth, "flops": flops, "source": dev.source,
                                "itemsize": 4, "call_s": call_s, "multi_row_bandwidth": multi_row,
                                "threads": threads}, indent=2))
    log(f"[calibrate] {dev.name}: {bandwidth / 1e9:.1f} GB/s ({multi_row / 1e9:.1f} for 2+ rows), {flops / 1e9:.1f} GFLOP/s, {call_s * 1e6:.0f} us per call "
        f"-> {path}")
    return dev


def zipf_routing(rng: np.random.Generator, tokens: int, experts: int, k: int, exponent: float) -> np.ndarray:
    """[tokens, k] distinct experts per token, expert e drawn with weight (rank e + 1)^-exponent."""
    p = 1.0 / np.arange(1, experts + 1) ** exponent
    p /= p.sum()
    return np.stack([rng.choice(experts, size=k, replace=False, p=p) for _ in range(tokens)])


def worker_shares(placement, layer: int, routing: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """Each worker's share of a routed batch: its (token, expert) pairs, replicas chosen by the placement's
    fractions, as the gateway's dispatch picks them."""
    W = placement.num_workers
    pairs: list[list[tuple[int, int]]] = [[] for _ in range(W)]
    for t, row in enumerate(routing):
        for e in row:
            w = rng.choice(W, p=placement.fractions[layer, e])
            pairs[w].append((t, int(e)))
    return [{"hosted": [e for e in range(placement.num_experts) if placement.hosts[layer, e, w]], "pairs": pairs[w]}
            for w in range(W)]


def time_share(share: dict, dim: int, inter: int, x: torch.Tensor, repeats: int) -> float:
    """One worker's routed-experts call for its share, alone: its hosted replicas' weights, its rows."""
    from moe_service.model.experts import RoutedExperts

    hosted = share["hosted"]
    experts = RoutedExperts(len(hosted), dim, inter)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    if not share["pairs"]:
        return 0.0
    local_of = {e: i for i, e in enumerate(hosted)}
    tokens = sorted({t for t, _ in share["pairs"]})
    row_of = {t: i for i, t in enumerate(tokens)}
    K = max(sum(1 for t2, _ in share["pairs"] if t2 == t) for t in tokens)
    local = torch.full((len(tokens), K), -1, dtype=torch.long)
    weights = torch.zeros(len(tokens), K)
    fill = [0] * len(tokens)
    for t, e in share["pairs"]:
        r = row_of[t]
        local[r, fill[r]], weights[r, fill[r]] = local_of[e], 0.1
        fill[r] += 1
    xs = x[tokens]
    return timeit(lambda: experts(xs, weights, local), repeats)


def run(preset: str = "bench", workers: int = 4, replicas_per_worker: int = 20, exponent: float = 1.2,
        batches: tuple[int, ...] = (8, 16, 32), prefill_tokens: int = 1024, repeats: int = 5, seed: int = 0) -> dict:
    from moe_service.checkpoint import open_source
    from moe_service.placement import plan

    torch.set_num_threads(1)
    args = open_source(preset).args
    dev = calibrate(threads=1, dim=args.hidden_size, inter=args.moe_intermediate_size)
    E, K, D, I = args.n_routed_experts, args.num_experts_per_tok, args.hidden_size, args.moe_intermediate_size
    rng = np.random.default_rng(seed)
    cost = worker_cost(args, dev)
    # the load window the controller would have seen: the same Zipf routing over many tokens
    window = np.bincount(zipf_routing(rng, 4096, E, K, exponent).reshape(-1), minlength=E)[None, :].astype(float)
    x = torch.randn(max(*batches, prefill_tokens), D)
    rows = []
    for tokens in (*batches, prefill_tokens):
        kind = "prefill" if tokens == prefill_tokens else "decode"
        routing = zipf_routing(rng, tokens, E, K, exponent)
        placements = {"token-balanced": plan(window, workers, replicas_per_worker),
                      "time-aware": plan(window, workers, replicas_per_worker, objective="time",
                                         worker_seconds=cost, pairs_per_step=tokens * K)}
        row = {"tokens": tokens, "kind": kind}
        for name, p in placements.items():
            shares = worker_shares(p, 0, routing, np.random.default_rng(seed + tokens))
            log(f"[placement bench] {kind} {tokens} tokens, {name}: timing {workers} workers one at a time")
            measured = [time_share(s, D, I, x, repeats) for s in shares]
            predicted = []
            for s in shares:
                per_expert = np.bincount([e for _, e in s["pairs"]], minlength=E)
                predicted.append(cost((per_expert > 0).sum(), len(s["pairs"]), (per_expert > 1).sum())
                                 if s["pairs"] else 0.0)
            row[name] = {"busiest_s": max(measured), "worker_s": measured, "predicted_s": predicted,
                         "replicas": int(p.replica_counts()[0].sum()),
                         "pairs": [len(s["pairs"]) for s in shares]}
        row["speedup"] = row["token-balanced"]["busiest_s"] / row["time-aware"]["busiest_s"]
        rows.append(row)
    errors = [abs(p / m - 1) for r in rows for name in ("token-balanced", "time-aware")
              for p, m in zip(r[name]["predicted_s"], r[name]["worker_s"]) if m > 0]
    return {"preset": preset, "workers": workers, "replicas_per_worker": replicas_per_worker, "zipf": exponent,
            "device": {"name": dev.name, "memory_bandwidth": dev.memory_bandwidth, "flops": dev.flops,
                       "call_s": dev.call_s, "multi_row_bandwidth": dev.multi_row_bandwidth},
            "rows": rows, "cost_model_error_max": max(errors), "cost_model_error_median": statistics.median(errors)}


def format_results(r: dict) -> str:
    d = r["device"]
    lines = [f"preset {r['preset']} expert shape, {r['workers']} workers x {r['replicas_per_worker']} replicas per "
             f"layer, Zipf {r['zipf']} routing; measured on this CPU, one worker at a time, 1 thread",
             f"cost model device (calibrated): {d['memory_bandwidth'] / 1e9:.1f} GB/s (2+ rows: "
             f"{d['multi_row_bandwidth'] / 1e9:.1f}), {d['flops'] / 1e9:.1f} GFLOP/s, "
             f"{d['call_s'] * 1e6:.0f} us per call",
             f"{'batch':>14}{'token-balanced':>16}{'time-aware':>12}{'speedup':>9}{'replicas tb/ta':>16}"]
    for row in r["rows"]:
        tb, ta = row["token-balanced"], row["time-aware"]
        lines.append(f"{row['kind']:>8} {row['tokens']:5d}{tb['busiest_s'] * 1e3:13.2f} ms{ta['busiest_s'] * 1e3:9.2f} ms"
                     f"{row['speedup']:8.2f}x{tb['replicas']:>9d}/{ta['replicas']}")
    lines.append(f"cost model vs measured, per worker: median error {r['cost_model_error_median']:.0%}, "
                 f"max {r['cost_model_error_max']:.0%}")
    return "\n".join(lines)
