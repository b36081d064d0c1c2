"""Time-aware against token-balanced placement, measured on this CPU, and the cost model checked against the
same measurements. Every timing is the fastest of its repeats: the work alone, as far as this shared
machine allows (a median still let one stretch of interference double a share now and then).

`calibrate()` measures this CPU's parameters for the cost model with the expert kernel at the expert shape
(1 to 64 rows through each of 16 experts, and the smallest routed-experts call for the fixed cost), one
thread as a worker computes here. The validation below routes real batches
over real placements: other row counts, experts per worker and groupings than the calibration saw.

`run()` then takes the `bench` preset's expert shape, Zipf routing over its experts, and for each batch
size plans both placements for 4 workers, routes a real batch through each, and times every worker's share
of the layer one worker at a time, in isolation (real matmuls over real weights, not the model). The
busiest worker's time is the layer's; the cost model's prediction for each worker is printed beside it."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from moe_service.bench.common import log, timeit
from moe_service.capacity.costmodel import CALIBRATION_FILE, Device, save_calibration, share_seconds, worker_cost


def calibrate(threads: int = 1, dim: int = 1024, inter: int = 704, path: Path = CALIBRATION_FILE) -> Device:
    """This CPU as a cost-model device (fp32, `threads` threads), written to `path`, measured with the call a
    worker makes (RoutedExperts) at the `bench` preset's expert shape over 16 experts (far more bytes than
    the caches hold), r rows to each:
    - r = 2..64: the time per expert is linear in r, weights then arithmetic, one after the other (one
      thread packs an expert's weights, then multiplies them: no overlap); the intercept is the multi-row
      bandwidth, the slope the FLOP/s (per pair, with its gathers and sums);
    - r = 1: the one-row bandwidth (a GEMV streams the weights: faster than packing them);
    - the fixed cost: the smallest call, one row through one tiny expert."""
    from moe_service.model.experts import RoutedExperts

    torch.set_num_threads(threads)
    tiny = RoutedExperts(1, 8, 8)
    torch.nn.init.normal_(tiny.gate_up_proj)
    torch.nn.init.normal_(tiny.down_proj)
    xs, wt, ex = torch.randn(1, 8), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long)
    call_s = timeit(lambda: tiny(xs, wt, ex), 200, reduce=min)
    n = 16
    many = RoutedExperts(n, dim, inter)
    torch.nn.init.normal_(many.gate_up_proj, std=0.02)
    torch.nn.init.normal_(many.down_proj, std=0.02)
    per_expert = {}
    for r in (1, 2, 4, 8, 16, 32, 64):
        x, w, e = torch.randn(n * r, dim), torch.full((n * r, 1), 0.1), torch.arange(n).repeat_interleave(r)[:, None]
        per_expert[r] = (timeit(lambda: many(x, w, e), 5, reduce=min) - call_s) / n
    dev = fit_device(per_expert, call_s, dim, inter, threads)
    save_calibration(dev, path, threads=threads, seconds_per_expert_by_rows=per_expert)
    log(f"[calibrate] {dev.name}: {dev.memory_bandwidth / 1e9:.1f} GB/s ({dev.multi_row_bandwidth / 1e9:.1f} for 2+ "
        f"rows), {dev.flops / 1e9:.1f} GFLOP/s after the reads, {call_s * 1e6:.0f} us per call -> {path}")
    return dev


def fit_device(per_expert: dict[int, float], call_s: float, dim: int, inter: int, threads: int) -> Device:
    """The device whose cost model gives `per_expert` (seconds per expert by rows through it, fixed cost
    removed): a line over 2+ rows (intercept: reading the weights, slope: one row's arithmetic), and the
    one-row read apart."""
    rows = np.array([r for r in per_expert if r > 1])
    slope, intercept = map(float, np.polyfit(rows, [per_expert[r] for r in rows], 1))
    weight_bytes, row_flops = 3 * dim * inter * 4, 2 * 3 * dim * inter
    if slope <= 0 or intercept <= 0 or per_expert[1] <= slope:
        raise RuntimeError(f"calibration measured no linear cost in rows per expert: {per_expert}; rerun on a quiet machine")
    return Device(f"this CPU ({threads} thread{'s' * (threads > 1)}, fp32)", weight_bytes / (per_expert[1] - slope),
                  row_flops / slope,
                  f"moe-service calibrate: routed experts {dim}x{inter}, 1-{max(per_expert)} rows to each expert (a "
                  "linear fit over 2+ rows: multi-row bandwidth and FLOP/s; 1 row: bandwidth), a 1-row call of a "
                  "tiny expert (fixed cost)", itemsize=4, call_s=call_s, multi_row_bandwidth=weight_bytes / intercept,
                  overlap=False)


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


def worker_experts(pool, hosted: list[int]):
    """A worker's RoutedExperts: its hosted replicas' weights, copied from the pool of every expert's."""
    from moe_service.model.experts import RoutedExperts

    experts = RoutedExperts(len(hosted), pool.dim, pool.inter_dim)
    idx = torch.tensor(hosted, dtype=torch.long)
    experts.gate_up_proj.data.copy_(pool.gate_up_proj.data[idx])
    experts.down_proj.data.copy_(pool.down_proj.data[idx])
    return experts


def time_share(share: dict, experts, x: torch.Tensor, repeats: int) -> float:
    """One worker's routed-experts call for its share, alone: its hosted replicas' weights, its rows."""
    if not share["pairs"]:
        return 0.0
    local_of = {e: i for i, e in enumerate(share["hosted"])}
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
    return timeit(lambda: experts(xs, weights, local), repeats, reduce=min)


def run(preset: str = "bench", workers: int = 4, replicas_per_worker: int = 20, exponent: float = 1.2,
        batches: tuple[int, ...] = (8, 16, 32), prefill_tokens: int = 1024, samples: int = 8, prefill_samples: int = 2,
        repeats: int = 5, seed: int = 0) -> dict:
    """Both placements of the same load window, timed on `samples` routed batches per size (prefill: fewer,
    each is long): a layer's time on a batch is its busiest worker's; its mean over the batches is compared."""
    from moe_service.checkpoint import open_source
    from moe_service.model.experts import RoutedExperts
    from moe_service.placement import plan
    from moe_service.placement.timeaware import busiest_seconds, floor_seconds, layer_pairs

    torch.set_num_threads(1)
    args = open_source(preset).args
    dev = calibrate(threads=1, dim=args.hidden_size, inter=args.moe_intermediate_size)
    E, K, D, I = args.n_routed_experts, args.num_experts_per_tok, args.hidden_size, args.moe_intermediate_size
    rng = np.random.default_rng(seed)
    cost = worker_cost(args, dev)
    # the load window the controller would have seen: the same Zipf routing over many tokens
    window = np.bincount(zipf_routing(rng, 4096, E, K, exponent).reshape(-1), minlength=E)[None, :].astype(float)
    pool = RoutedExperts(E, D, I)
    torch.nn.init.normal_(pool.gate_up_proj, std=0.02)
    torch.nn.init.normal_(pool.down_proj, std=0.02)
    x = torch.randn(max(*batches, prefill_tokens), D)
    rows = []
    for tokens in (*batches, prefill_tokens):
        kind = "prefill" if tokens == prefill_tokens else "decode"
        placements = {"token-balanced": plan(window, workers, replicas_per_worker),
                      "time-aware": plan(window, workers, replicas_per_worker, objective="time",
                                         worker_seconds=cost, pairs_per_step=tokens * K)}
        modules = {name: [worker_experts(pool, [e for e in range(E) if p.hosts[0, e, w]]) for w in range(workers)]
                   for name, p in placements.items()}
        # predicted at the window's expected loads; the floor: what no placement is predicted to beat
        row = {"tokens": tokens, "kind": kind,
               "floor_s": floor_seconds(layer_pairs(window, tokens * K)[0], workers, cost)}
        for name, p in placements.items():
            row[name] = {"busiest_s": [], "worker_s": [], "predicted_s": [], "pairs": [],
                         "replicas": int(p.replica_counts()[0].sum()),
                         "expected_s": float(busiest_seconds(window, p, cost, tokens * K)[0])}
        n = prefill_samples if kind == "prefill" else samples
        log(f"[placement bench] {kind} {tokens} tokens: {n} routed batches x 2 placements x {workers} workers, "
            "each worker timed alone")
        for i in range(n):
            routing = zipf_routing(rng, tokens, E, K, exponent)
            for name, p in placements.items():  # interleaved: both placements see the same machine state
                shares = worker_shares(p, 0, routing, np.random.default_rng(seed + 1000 * tokens + i))
                measured = [time_share(s, m, x, repeats) for s, m in zip(shares, modules[name])]
                predicted = [share_seconds(cost, np.bincount([e for _, e in s["pairs"]], minlength=E))
                             if s["pairs"] else 0.0 for s in shares]
                r = row[name]
                r["busiest_s"].append(max(measured))
                r["worker_s"] += measured
                r["predicted_s"] += predicted
                r["pairs"] += [len(s["pairs"]) for s in shares]
        for name in placements:
            r = row[name]
            r["mean_busiest_s"] = statistics.fmean(r["busiest_s"])
            # the cost model on the same batches: each batch's predicted busiest worker, averaged
            r["predicted_busiest_s"] = float(np.mean(np.reshape(r["predicted_s"], (n, workers)).max(axis=1)))
        row["speedup"] = row["token-balanced"]["mean_busiest_s"] / row["time-aware"]["mean_busiest_s"]
        row["predicted_speedup"] = row["token-balanced"]["predicted_busiest_s"] / row["time-aware"]["predicted_busiest_s"]
        row["objective_speedup"] = row["token-balanced"]["expected_s"] / row["time-aware"]["expected_s"]
        row["ceiling"] = row["token-balanced"]["expected_s"] / row["floor_s"]
        rows.append(row)
    errors = [abs(p / m - 1) for r in rows for name in ("token-balanced", "time-aware")
              for p, m in zip(r[name]["predicted_s"], r[name]["worker_s"]) if m > 0]
    return {"preset": preset, "workers": workers, "replicas_per_worker": replicas_per_worker, "zipf": exponent,
            "samples": samples, "prefill_samples": prefill_samples,
            "device": {"name": dev.name, "memory_bandwidth": dev.memory_bandwidth, "flops": dev.flops,
                       "call_s": dev.call_s, "multi_row_bandwidth": dev.multi_row_bandwidth, "overlap": dev.overlap},
            "rows": rows, "cost_model_error_max": max(errors), "cost_model_error_median": statistics.median(errors),
            "cost_model_error_p90": float(np.quantile(errors, 0.9)), "shares": len(errors)}


def format_results(r: dict) -> str:
    d = r["device"]
    lines = [f"preset {r['preset']} expert shape, {r['workers']} workers x {r['replicas_per_worker']} replicas per "
             f"layer, Zipf {r['zipf']} routing; measured on this CPU, one worker at a time, 1 thread; the busiest "
             f"worker's share, mean over {r['samples']} routed batches ({r['prefill_samples']} for prefill)",
             f"cost model device (calibrated): {d['memory_bandwidth'] / 1e9:.1f} GB/s (2+ rows: "
             f"{d['multi_row_bandwidth'] / 1e9:.1f}), {d['flops'] / 1e9:.1f} GFLOP/s "
             f"{'overlapping' if d['overlap'] else 'after'} the reads, {d['call_s'] * 1e6:.0f} us per call",
             "measured (predicted on the same batches): the busiest worker's share; objective: what the planner "
             "minimises, the busiest worker's expected time; ceiling: token-balanced's objective / the floor no "
             "placement's objective beats",
             f"{'batch':>14}{'token-balanced':>22}{'time-aware':>20}{'speed-up':>19}{'objective':>11}{'ceiling':>9}"
             f"{'replicas tb/ta':>16}"]
    for row in r["rows"]:
        tb, ta = row["token-balanced"], row["time-aware"]
        lines.append(f"{row['kind']:>8} {row['tokens']:5d}"
                     f"{tb['mean_busiest_s'] * 1e3:10.2f} ({tb['predicted_busiest_s'] * 1e3:6.2f}) ms"
                     f"{ta['mean_busiest_s'] * 1e3:8.2f} ({ta['predicted_busiest_s'] * 1e3:6.2f}) ms"
                     f"{row['speedup']:9.2f}x ({row['predicted_speedup']:.2f}x){row['objective_speedup']:10.2f}x"
                     f"{row['ceiling']:8.2f}x{tb['replicas']:>9d}/{ta['replicas']}")
    lines.append(f"cost model vs measured, {r['shares']} worker shares: median error {r['cost_model_error_median']:.0%}, "
                 f"90th percentile {r['cost_model_error_p90']:.0%}, max {r['cost_model_error_max']:.0%}")
    return "\n".join(lines)
