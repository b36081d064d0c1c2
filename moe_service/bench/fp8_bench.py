"""FP8 routed experts on this machine, measured: a worker's expert compute at decode (1-8 rows per
expert) and at prefill, FP8 beside the float32 path workers use by default and beside bf16 (this CPU has
no native bf16 or FP8 arithmetic, so both convert on the fly); where FP8's time goes (dequantizing vs the
matmuls); the floor of reading its bytes; and a served worker's memory with FP8 against bf16 experts,
at its peak during prefill and decode."""

from __future__ import annotations

import torch

from moe_service.bench.common import log, timeit
from moe_service.model.experts import RoutedExperts, group_pairs
from moe_service.model.fp8 import FP8Experts
from moe_service.model.presets import preset_args

ROWS = (1, 2, 4, 8, 64)  # rows per expert: decode steps, and a prefill chunk's share


def compute(preset: str = "bench", experts: int = 8, repeats: int = 5) -> dict:
    """A layer call's worth of work: `experts` experts, each with the same number of rows."""
    args = preset_args(preset)
    D, I = args.hidden_size, args.moe_intermediate_size
    torch.manual_seed(0)
    dense = RoutedExperts(experts, D, I)
    torch.nn.init.normal_(dense.gate_up_proj, std=0.02)
    torch.nn.init.normal_(dense.down_proj, std=0.02)
    bf16 = RoutedExperts(experts, D, I).to(torch.bfloat16)
    bf16.load_state_dict({k: v.bfloat16() for k, v in dense.state_dict().items()})
    fp8 = FP8Experts.from_dense(dense)
    out = {"preset": preset, "experts": experts, "hidden": D, "inter": I, "threads": torch.get_num_threads(),
           "rows": {}}
    for rows in ROWS:
        log(f"[fp8 bench] {rows} rows per expert")
        local = torch.arange(experts).repeat_interleave(rows)[:, None]
        g = group_pairs(torch.ones(local.shape), local, experts)
        x = torch.randn(local.shape[0], D)
        t32 = timeit(lambda: dense.run(x, g), repeats)
        t16 = timeit(lambda: bf16.run(x.bfloat16(), g), repeats)
        t8 = timeit(lambda: fp8.run(x, g), repeats)
        out["rows"][rows] = {"float32_s": t32, "bfloat16_s": t16, "fp8_s": t8, "fp8_vs_float32": t8 / t32,
                             "bfloat16_vs_float32": t16 / t32}
    # where FP8's time goes: dequantizing the experts' weights, and the rest (the matmuls on them)
    dequantize = timeit(lambda: [fp8.weights(s) for s in range(experts)], repeats)
    fp8_bytes = sum(p.numel() * p.element_size() for p in fp8.parameters())
    raw = [p.view(torch.uint8) if p.dtype != torch.float32 else p for p in fp8.parameters()]
    copies = [torch.empty_like(r) for r in raw]
    read = timeit(lambda: [c.copy_(r) for c, r in zip(copies, raw)], repeats)  # the floor: its bytes, once
    out.update(dequantize_s=dequantize, fp8_bytes=fp8_bytes, float32_bytes=fp8_bytes * 4 // 1, read_fp8_bytes_s=read,
               decode_fp8_vs_float32=max(out["rows"][r]["fp8_vs_float32"] for r in ROWS if r <= 8))
    return out


def memory(preset: str = "bench", workers: int = 2) -> dict:
    """Each worker's resident memory for its experts (its peak during a prefill and a decode, less what
    it held before loading any), with bf16 experts and with FP8 experts computed in bf16."""
    import ray

    from moe_service.bench.common import local_service
    from moe_service.client import Client
    from moe_service.serving.local import start_service

    if not ray.is_initialized():
        from moe_service.serving.proxy_limits import RUNTIME_ENV

        ray.init(num_cpus=2, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                 runtime_env=RUNTIME_ENV)
    out = {}
    for kind, settings in (("bf16", {}), ("fp8", {"quantize": "fp8"})):
        log(f"[fp8 bench] a served {preset} with {kind} experts: prefill and decode")
        svc = start_service(local_service(model=preset, workers=workers, dtype="bfloat16", **settings))
        try:
            loaded = svc.worker_pings()
            with Client(svc.address) as c:
                c.generate_ids([1] + list(range(3, 400)), max_new_tokens=2)  # a prefill of 400 tokens
                c.generate_ids([1, 5, 9], max_new_tokens=32)  # decode
            pings = svc.worker_pings()
        finally:
            svc.shutdown()
        out[kind] = {"expert_dtypes": sorted({d for p in pings for d in p["expert_dtypes"]}),
                     "expert_bytes": sum(p["expert_bytes"] for p in pings),
                     "loaded_rss_bytes": sum(p["rss_bytes"] - p["base_rss_bytes"] for p in loaded),
                     "peak_rss_bytes": sum(p["peak_rss_bytes"] - p["base_rss_bytes"] for p in pings)}
    bf16, fp8 = out["bf16"], out["fp8"]
    # what serving adds on top of loaded weights whatever their dtype (the runtime's first-use memory,
    # message buffers), as the bf16 workers show it
    serving = bf16["peak_rss_bytes"] - bf16["loaded_rss_bytes"]
    out.update(serving_overhead_bytes=serving, fp8_vs_bf16_weights=fp8["expert_bytes"] / bf16["expert_bytes"],
               fp8_vs_bf16_peak_rss=fp8["peak_rss_bytes"] / bf16["peak_rss_bytes"],
               fp8_vs_bf16_peak_rss_for_experts=(fp8["peak_rss_bytes"] - serving) / (bf16["peak_rss_bytes"] - serving))
    return out


def quality(dtype: torch.dtype = torch.bfloat16) -> dict:
    """The embedded coder's held-out loss with its routed experts as shipped (bf16) and block-quantized to
    FP8, both computed in `dtype`: what FP8 costs in quality."""
    import math

    from moe_service.checkpoint import load_model
    from moe_service.coder.train import corpus_files, encode_corpus, evaluate, read
    from moe_service.engine.tokenizer import load_tokenizer

    model = load_model("coder", dtype=dtype)
    tok = load_tokenizer("coder", model.args)
    held = encode_corpus(tok.tok, read(corpus_files()[1]), 1, 2)
    log("[fp8 bench] the coder's held-out loss, bf16 experts")
    out = {"dtype": str(dtype).removeprefix("torch."), "tokens": len(held)}
    out["bf16_loss"] = evaluate(model, held, 256, len(held))
    for layer in model.args.moe_layers:
        mlp = model.layers[layer].mlp
        mlp.experts = FP8Experts.from_dense(mlp.experts)
    log("[fp8 bench] the coder's held-out loss, FP8 experts")
    out["fp8_loss"] = evaluate(model, held, 256, len(held))
    out.update(bf16_perplexity=math.exp(out["bf16_loss"]), fp8_perplexity=math.exp(out["fp8_loss"]))
    return out


def run(preset: str = "bench", workers: int = 2, repeats: int = 5) -> dict:
    return {"compute": compute(preset, repeats=repeats), "quality": quality(), "memory": memory(preset, workers)}


def format_results(r: dict) -> str:
    c = r["compute"]
    lines = [f"FP8 experts on this CPU ({c['threads']} threads): {c['experts']} experts of {c['preset']} "
             f"(hidden {c['hidden']}, inter {c['inter']}), seconds per layer call",
             f"{'rows/expert':>12}{'float32':>11}{'bfloat16':>11}{'fp8':>11}{'fp8/fp32':>10}{'bf16/fp32':>10}"]
    for rows, t in c["rows"].items():
        lines.append(f"{rows:>12}{t['float32_s'] * 1e3:9.2f}ms{t['bfloat16_s'] * 1e3:9.2f}ms{t['fp8_s'] * 1e3:9.2f}ms"
                     f"{t['fp8_vs_float32']:9.2f}x{t['bfloat16_vs_float32']:9.2f}x")
    lines.append(f"fp8 dequantizing the {c['experts']} experts: {c['dequantize_s'] * 1e3:.2f} ms; reading their FP8 "
                 f"bytes once (the floor of a fused kernel): {c['read_fp8_bytes_s'] * 1e3:.2f} ms")
    q = r["quality"]
    lines.append(f"coder held-out ({q['tokens']:,} tokens, computed in {q['dtype']}): perplexity {q['bf16_perplexity']:.3f} "
                 f"with bf16 experts, {q['fp8_perplexity']:.3f} with FP8 experts "
                 f"({q['fp8_perplexity'] / q['bf16_perplexity'] - 1:+.2%})")
    m = r["memory"]
    for kind in ("bf16", "fp8"):
        lines.append(f"served {kind:5} experts {m[kind]['expert_dtypes']}: {m[kind]['expert_bytes'] / 2**20:.0f} MiB of "
                     f"weights, resident above the bare worker {m[kind]['loaded_rss_bytes'] / 2**20:.0f} MiB loaded, "
                     f"{m[kind]['peak_rss_bytes'] / 2**20:.0f} MiB at the peak of prefill and decode")
    lines.append(f"fp8 / bf16: weights {m['fp8_vs_bf16_weights']:.2f}x, peak resident {m['fp8_vs_bf16_peak_rss']:.2f}x, "
                 f"peak resident less what serving adds whatever the dtype ({m['serving_overhead_bytes'] / 2**20:.0f} "
                 f"MiB) {m['fp8_vs_bf16_peak_rss_for_experts']:.2f}x")
    return "\n".join(lines)
