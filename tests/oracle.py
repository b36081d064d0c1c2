"""The oracle: tiny random transformers DeepseekV2 and DeepseekV3 checkpoints written by save_pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BASE: dict[str, Any] = dict(
    vocab_size=101, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=16,
    q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, first_k_dense_replace=1,
    max_position_embeddings=256, bos_token_id=1, eos_token_id=2, topk_method="greedy",
)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}

# together these cover every option the model core claims
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "qlora_grouped_scaled": dict(q_lora_rank=12, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                 routed_scaling_factor=2.5, first_k_dense_replace=0, vocab_size=257),
    "yarn_normtopk_dense2": dict(rope_parameters=YARN, norm_topk_prob=True, first_k_dense_replace=2,
                                 num_hidden_layers=4, n_shared_experts=2, num_experts_per_tok=3),
    "qlora_yarn_scaled": dict(q_lora_rank=12, rope_parameters=dict(YARN, mscale=1.0, factor=8.0),
                              routed_scaling_factor=16.0, vocab_size=131, n_routed_experts=12,
                              num_experts_per_tok=4),
    "bias_grouped_normtopk": dict(attention_bias=True, topk_method="group_limited_greedy", n_group=2,
                                  topk_group=1, norm_topk_prob=True, vocab_size=97, n_shared_experts=0),
    # expert rows of 18 floats (72 bytes) are not 16-byte aligned: the grouped GEMM cannot take them
    # (transformers' own grouped path has the same limit, so the oracle runs its eager experts)
    "odd_expert_width": dict(moe_intermediate_size=18, intermediate_size=50, experts_implementation="eager"),
}


# DeepSeek-V3's router (sigmoid scores, a correction bias for choosing, groups ranked by their top-2):
# each config has n_group > 1 with topk_group < n_group unless it is Kimi-K2's one group
V3_BASE: dict[str, Any] = dict(
    {k: v for k, v in BASE.items() if k != "topk_method"}, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
    topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, num_key_value_heads=BASE["num_attention_heads"])
V3_CONFIGS: dict[str, dict[str, Any]] = {
    "v3_grouped": {},
    "v3_qlora_yarn_dense2": dict(q_lora_rank=12, rope_parameters=YARN, first_k_dense_replace=2, num_hidden_layers=4,
                                 n_shared_experts=2, routed_scaling_factor=1.7),
    "v3_kimi_one_group": dict(n_group=1, topk_group=1, num_experts_per_tok=6, routed_scaling_factor=2.827,
                              norm_topk_prob=False, first_k_dense_replace=0),
}


def hf_model(overrides: dict[str, Any], seed: int = 0, family: str = "v2"):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    config_class, model_class, base = ((DeepseekV3Config, DeepseekV3ForCausalLM, V3_BASE) if family == "v3"
                                       else (DeepseekV2Config, DeepseekV2ForCausalLM, BASE))
    cfg = config_class(**{**base, **overrides})
    torch.manual_seed(seed)
    model = model_class(cfg).eval()
    # a random init has near-uniform routing; widen the gate so top-k choices are decisive, and
    # give the experts a healthy scale so a wrong routing decision shows in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
            elif "norm" not in name:
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # as large as the spread of the sigmoid scores, so the biased choice differs from the unbiased
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.3)
    if family == "v2" and cfg.norm_topk_prob:
        _patch_norm_topk_prob(model)
    return model


def _patch_norm_topk_prob(model) -> None:
    """transformers 5's DeepseekV2TopkRouter ignores `norm_topk_prob`; DeepSeek-V2's own code
    (modeling_deepseek.py) renormalises the top-k weights instead of scaling them. Restore that here."""
    for module in model.modules():
        if type(module).__name__ == "DeepseekV2TopkRouter":
            orig = module.forward
            scaling = module.routed_scaling_factor

            def forward(hidden_states, orig=orig, scaling=scaling):
                logits, w, idx = orig(hidden_states)
                w = w / scaling
                return logits, w / (w.sum(dim=-1, keepdim=True) + 1e-20), idx

            module.forward = forward


def write_checkpoint(path: Path, overrides: dict[str, Any], seed: int = 0, shard: str | None = None,
                     family: str = "v2"):
    model = hf_model(overrides, seed, family)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return model
