"""On paper, until a GPU is lent: one decode step of DeepSeek-V2-Lite and DeepSeek-V2 on H100/H200,
term by term (the gateway's dense part, the per-layer dispatch, the experts), from the roofline cost
model and datasheet numbers plus this project's measured per-layer software cost. Projected, not
measured; scripts/gpu_check.sh measures the terms on a real GPU."""

from __future__ import annotations

from moe_service.capacity.costmodel import (DEVICES, SHAPES, TERMS_HEADER, dense_params, expert_bytes,
                                            format_terms_ms, project_decode_step)

BATCHES = (1, 32, 256)


def run(software_ms: float = 0.42, context: int = 2048, workers: int = 8, rtt_us: float = 50.0,
        link_gbps: float = 100.0) -> dict:
    rows = []
    for model, args in SHAPES.items():
        for dev in DEVICES.values():
            for b in BATCHES:
                terms = project_decode_step(args, dev, b, context, workers, software_ms / 1e3, rtt_us / 1e6,
                                            link_gbps * 1e9 / 8)
                rows.append({"model": model, "device": dev.name, "batch": b, **terms})
    return {"kind": "projected (roofline on datasheet numbers), not measured", "software_ms_per_layer": software_ms,
            "context_tokens": context, "workers": workers, "rtt_us": rtt_us, "link_gbps": link_gbps,
            "devices": {k: vars(d) for k, d in DEVICES.items()},
            "shapes": {m: {"moe_layers": len(a.moe_layers), "dense_params": dense_params(a),
                           "expert_bytes_bf16": expert_bytes(a)} for m, a in SHAPES.items()},
            "rows": rows}


def format_results(r: dict) -> str:
    lines = [f"PROJECTED (roofline, datasheet numbers; not measured): one decode step, context {r['context_tokens']}, "
             f"{r['workers']} expert workers, {r['software_ms_per_layer']} ms of software per layer call + "
             f"{r['rtt_us']:.0f} us network round trip, {r['link_gbps']:.0f} Gb/s link",
             f"{'model':18}{'device':16}{'batch':>6}{TERMS_HEADER}{'step':>10}{'tokens/s':>10}  dominant"]
    for row in r["rows"]:
        lines.append(f"{row['model']:18}{row['device'][:15]:16}{row['batch']:6d} {format_terms_ms(row)}"
                     f"{row['step_s'] * 1e3:8.2f}ms{row['batch'] / row['step_s']:10.0f}  {row['dominant'].removesuffix('_s')}")
    return "\n".join(lines)
