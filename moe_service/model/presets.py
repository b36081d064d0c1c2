"""Built-in model shapes: no download, weights made from a fixed seed."""

from __future__ import annotations

import dataclasses

from moe_service.model.args import ModelArgs

# what the random presets share: a small vocabulary's special ids, direct q projection, greedy top-k
_RANDOM = dict(bos_token_id=1, eos_token_id=2, max_position_embeddings=4096, q_lora_rank=None, topk_method="greedy",
               first_k_dense_replace=1)

PRESETS: dict[str, ModelArgs] = {
    # seconds to build; the tests' and the default run's model
    "tiny": ModelArgs(name="tiny", vocab_size=512, hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                      num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=32,
                      **_RANDOM),
    # about 1.1B parameters, 64 experts top-6 + 2 shared: the benchmark's shape
    "bench": ModelArgs(name="bench", vocab_size=32000, hidden_size=1024, num_hidden_layers=8, intermediate_size=2816,
                       num_attention_heads=16, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                       v_head_dim=64, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                       moe_intermediate_size=704, **_RANDOM),
}

# DeepSeek-V3's router at the tiny preset's size: sigmoid scores, a correction bias, 4 groups of which 2
PRESETS["tiny-v3"] = dataclasses.replace(
    PRESETS["tiny"], name="tiny-v3", model_type="deepseek_v3", topk_method="noaux_tc", scoring_func="sigmoid",
    n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)

# ... with one multi-token-prediction layer, its block MoE as in DeepSeek-V3: the speculative decoding tests' draft
PRESETS["tiny-v3-mtp"] = dataclasses.replace(PRESETS["tiny-v3"], name="tiny-v3-mtp", num_nextn_predict_layers=1)

# the routing shape of DeepSeek-V2-Lite (64 routed experts, top-6) at the tiny preset's size: the real
# answers of a SIMULATED cluster (serving/simulated.py), cheap enough for 8-16 workers on a small machine
PRESETS["tiny-64"] = dataclasses.replace(PRESETS["tiny"], name="tiny-64", n_routed_experts=64, num_experts_per_tok=6)

# "-skewed" variants: same shapes, but in every MoE layer a few experts' gate rows are scaled up so
# routing concentrates on them, as real traffic does (hot experts) -- the rebalancing workload
PRESETS["tiny-skewed"] = dataclasses.replace(PRESETS["tiny"], name="tiny-skewed")
PRESETS["bench-skewed"] = dataclasses.replace(PRESETS["bench"], name="bench-skewed")
# (hot experts, scale): on bench-skewed the 10 hot experts of 64 take about two thirds of the routed tokens,
# the hottest about 5.6x the mean expert's share
GATE_SKEW: dict[str, tuple[int, float]] = {"tiny-skewed": (2, 6.0), "bench-skewed": (10, 8.0)}

PRESET_SEED = 20240507  # DeepSeek-V2's release date; any fixed number would do


def preset_args(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]
