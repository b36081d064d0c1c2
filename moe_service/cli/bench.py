"""`moe-service bench WHAT`: runs one benchmark module, prints and saves its results."""

from __future__ import annotations

import argparse


def cmd_bench(ns: argparse.Namespace) -> int:
    from moe_service.bench.common import save_results

    if ns.what == "model":
        from moe_service.bench import model_bench as b

        r = b.run(ns.preset, threads=ns.threads, repeats=ns.repeats)
    elif ns.what == "transport":
        from moe_service.bench import transport_bench as b

        r = b.run()
    elif ns.what == "served" and ns.overload:
        from moe_service.bench import overload as b

        r = b.run(ns.preset, workers=ns.workers, out_dir=ns.out)
    elif ns.what == "served":
        from moe_service.bench import served_bench as b

        r = b.run(ns.preset, workers=ns.workers, repeats=ns.repeats, micro_batches=ns.micro_batches)
    elif ns.what == "simulated":
        from moe_service.bench import simulated_bench as b

        r = b.run_phases(workers=ns.workers if ns.workers != 2 else 8)
    elif ns.what == "placement":
        from moe_service.bench import placement_bench as b

        r = b.run(ns.preset, workers=ns.workers if ns.workers != 2 else 4, repeats=ns.repeats + 2)
    elif ns.what == "ingress":
        from moe_service.bench import ingress_bench as b

        r = b.run(out_dir=ns.out)
    elif ns.what == "fp8":
        from moe_service.bench import fp8_bench as b

        r = b.run(ns.preset, workers=ns.workers, repeats=ns.repeats + 2)
    elif ns.what == "cache":
        from moe_service.bench import cache_bench as b

        r = b.run(out_dir=ns.out, parts=tuple(ns.parts.split(",")), preset=ns.preset)
    elif ns.what == "soak":
        from moe_service.bench import soak_bench as b

        r = b.run(seconds=ns.seconds, out_dir=ns.out)
    elif ns.what == "speculative":
        from moe_service.bench import speculative_bench as b

        r = b.run(workers=ns.workers, tokens=ns.draft_tokens, pairs=ns.repeats + 2, out_dir=ns.out)
    elif ns.what == "projection":
        from moe_service.bench import projection as b

        r = b.run()
    elif ns.what == "skewed":
        from moe_service.bench import skewed_bench as b

        # the trained model's own routing is skewed; a random preset's is made so by its "-skewed" twin
        skewed = ns.preset if ns.preset.endswith("-skewed") or ns.preset == "coder" else ns.preset + "-skewed"
        r = b.run(skewed, workers=ns.workers,
                  out_dir=ns.out)
    print(b.format_results(r))
    print(f"results: {save_results('overload' if getattr(ns, 'overload', False) else ns.what, r, ns.out)}")
    return 0


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (results printed and written under --out)")
    bench.add_argument("what", choices=["model", "transport", "served", "skewed", "placement", "simulated",
                                          "projection", "fp8", "ingress", "cache", "soak", "speculative"],
                       help="model: this model vs transformers; transport: RunExperts vs a raw gRPC echo; served: the "
                            "service vs in-process, and 1/8/32 clients; skewed: throughput before/after rebalancing; "
                            "placement: time-aware vs token-balanced placement, measured per worker on this CPU; simulated: "
                            "a live SIMULATED cluster (8 H200 workers) before/after a rebalance, against simulate; "
                            "projection: a decode step of DeepSeek-V2(-Lite) on H100/H200, on paper; fp8: FP8 experts' "
                            "compute beside float32 and bf16, and a served worker's memory with them; ingress: the CPU a streamed "
                            "token costs every process at the front, per message and coalesced; cache: the paged KV cache's "
                            "concurrency at fixed memory, prefix reuse, preemption and cache-aware routing, before/after; soak: "
                            "each request's longest gap between tokens while workers are killed, min_replicas 1 and 2; speculative: "
                            "coder's MTP draft and an oracle draft against plain decoding at 1 to 16 sequences")
    bench.add_argument("--workers", type=int, default=2)
    bench.add_argument("--preset", default="bench")
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--out", default="bench-results")
    bench.add_argument("--overload", action="store_true", help="served: bursts at 1x, 2x, 4x and 8x capacity "
                       "instead (use --preset tiny): goodput, refusals, latency, memory, a plot")
    bench.add_argument("--micro-batches", type=int, default=None, help="served: the scheduler's micro_batches "
                       "(default: the service's)")
    bench.add_argument("--draft-tokens", type=int, default=2, help="speculative: draft tokens a step")
    bench.add_argument("--seconds", type=float, default=180.0, help="soak: seconds per phase")
    bench.add_argument("--parts", default="concurrency,prefix,preemption,affinity",
                       help="cache: which measurements, comma-separated")
    bench.set_defaults(fn=cmd_bench)
