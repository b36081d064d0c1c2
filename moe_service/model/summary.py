"""Architecture summary: what `moe-service info` prints and the service's ModelInfo returns."""

from __future__ import annotations

import math

import torch

from moe_service.model.args import ModelArgs


def summarize(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    from moe_service.checkpoint.names import expected_shapes

    shapes = expected_shapes(args)
    total = sum(math.prod(s) for s in shapes.values())
    per_expert = 3 * args.hidden_size * args.moe_intermediate_size
    moe_layers = args.moe_layers
    idle_experts = args.n_routed_experts - args.num_experts_per_tok
    active = total - len(moe_layers) * idle_experts * per_expert
    elt = torch.empty((), dtype=dtype).element_size()
    return {
        "name": args.name,
        "layers": args.num_hidden_layers,
        "moe_layers": len(moe_layers),
        "hidden_size": args.hidden_size,
        "vocab_size": args.vocab_size,
        "attention_heads": args.num_attention_heads,
        "routed_experts_per_layer": args.n_routed_experts,
        "shared_experts_per_layer": args.n_shared_experts,
        "experts_per_token": args.num_experts_per_tok,
        "topk_method": args.topk_method,
        "params_total": total,
        "params_active_per_token": active,
        "params_routed_experts": len(moe_layers) * args.n_routed_experts * per_expert,
        "kv_cache_values_per_token_per_layer": args.kv_cache_dim,
        "kv_cache_bytes_per_token": args.num_hidden_layers * args.kv_cache_dim * elt,
        "dtype": str(dtype).removeprefix("torch."),
        "max_position_embeddings": args.max_position_embeddings,
    }


def format_summary(s: dict[str, object]) -> str:
    def n(x: object) -> str:
        v = float(x)  # type: ignore[arg-type]
        return f"{v / 1e9:.2f}B" if v >= 1e9 else f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v:,.0f}"

    lines = [
        f"model            {s['name']} ({s['dtype']})",
        f"layers           {s['layers']} ({s['moe_layers']} MoE), hidden {s['hidden_size']}, "
        f"{s['attention_heads']} heads, vocab {s['vocab_size']}",
        f"experts/layer    {s['routed_experts_per_layer']} routed (top-{s['experts_per_token']}, {s['topk_method']})"
        f" + {s['shared_experts_per_layer']} shared",
        f"parameters       {n(s['params_total'])} total, {n(s['params_active_per_token'])} active per token, "
        f"{n(s['params_routed_experts'])} in routed experts",
        f"KV cache         {s['kv_cache_values_per_token_per_layer']} values/token/layer (latent + RoPE key), "
        f"{s['kv_cache_bytes_per_token']:,} bytes/token",
    ]
    return "\n".join(lines)
