"""ModelArgs: the architecture of a DeepSeek-V2-style model, read from a Hugging Face config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

# the dtypes a model is served in, by the names configs and the command line use
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# the families this project serves: the model types of each, and how each routes (its top-k methods and
# scoring function). DeepSeek-V3, R1, V3.1 and Moonlight are "deepseek_v3"; Kimi-K2 is "kimi_k2" on the
# same DeepseekV3ForCausalLM architecture.
FAMILIES = {
    "v2": {"model_types": ("deepseek_v2",), "architecture": "DeepseekV2ForCausalLM",
           "topk_methods": ("greedy", "group_limited_greedy"), "scoring_func": "softmax"},
    "v3": {"model_types": ("deepseek_v3", "kimi_k2"), "architecture": "DeepseekV3ForCausalLM",
           "topk_methods": ("noaux_tc",), "scoring_func": "sigmoid"},
}
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES.values() for t in f["model_types"])


@dataclass(frozen=True)
class ModelArgs:
    """Defaults are DeepSeek-V2-Lite's config (the smallest real checkpoint of this family)."""

    # vocabulary and shape
    vocab_size: int = 102400
    hidden_size: int = 2048
    num_hidden_layers: int = 27
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    # dense MLP (the first `first_k_dense_replace` layers, and layers off `moe_layer_freq`)
    intermediate_size: int = 10944
    # mla
    num_attention_heads: int = 16
    q_lora_rank: int | None = None  # None: direct q projection; set: low-rank q with its norm
    kv_lora_rank: int = 512  # the compressed latent the KV cache stores
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # the decoupled RoPE key, shared by all heads
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor": ..., ...} or None
    # moe
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1408
    # the router: V2 scores by softmax and picks greedily (within the best groups); V3 scores by sigmoid
    # and picks the top-k of score + e_score_correction_bias within the groups whose top-2 sum is best
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    # the model family's config.json type; V3 checkpoints also carry multi-token-prediction layers
    model_type: str = "deepseek_v2"
    num_nextn_predict_layers: int = 0
    # the MTP layers' block is dense (intermediate_size), whatever the rule below says: a draft trained for a
    # V2 model (the embedded coder's) that needs no routed expert; DeepSeek-V3's own follow the rule (MoE)
    mtp_dense: bool = False
    # provenance, for summaries
    name: str = field(default="deepseek-v2", compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        fam = FAMILIES[self.family]
        if self.topk_method not in fam["topk_methods"]:
            raise ValueError(f"topk_method {self.topk_method!r} is not supported for {self.model_type}; expected one "
                             f"of {fam['topk_methods']}")
        if self.scoring_func != fam["scoring_func"]:
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported for {self.model_type}; expected "
                             f"{fam['scoring_func']!r}")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            if self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group ({self.n_group})"
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
            if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
                raise ValueError(f"noaux_tc ranks groups by their top-2 experts: n_routed_experts ({self.n_routed_experts}) "
                                 f"/ n_group ({self.n_group}) must be at least 2")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, n_routed_experts={self.n_routed_experts}]"
            )
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")

    # derived quantities
    @property
    def family(self) -> str:
        """"v2" or "v3"."""
        return next(f for f, d in FAMILIES.items() if self.model_type in d["model_types"])

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values stored per token per layer: the latent plus the RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        # the rule of DeepSeek-V2's reference code
        return (
            not (self.mtp_dense and layer >= self.num_hidden_layers)
            and self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_hidden_layers) if self.is_moe_layer(layer)]

    @property
    def mtp_layers(self) -> list[int]:
        """The multi-token-prediction layers' indices (DeepSeek-V3's draft): after the main layers."""
        return [self.num_hidden_layers + i for i in range(self.num_nextn_predict_layers)]

    # Hugging Face config.json <-> ModelArgs
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "checkpoint") -> "ModelArgs":
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json has model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if config.get("rope_interleave") is False:
            raise ValueError("config.json has rope_interleave=false; this project applies RoPE to interleaved pairs "
                             "(DeepSeek's own layout, transformers' default)")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json has hidden_act {config['hidden_act']!r}; only 'silu' is supported")
        if config.get("mlp_bias"):
            raise ValueError("config.json has mlp_bias=true; DeepSeek-V2 MLPs have no bias")
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        if kv_heads != heads:
            raise ValueError(
                f"config.json has num_key_value_heads={kv_heads} != num_attention_heads={heads}; MLA expects them equal"
            )
        rope_theta, rope_scaling = _read_rope(config)
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in config.items() if k in fields and v is not None}
        known.update(rope_theta=rope_theta, rope_scaling=rope_scaling, name=name)
        for key in ("n_group", "topk_group"):
            known.setdefault(key, 1)
        fam = next(d for d in FAMILIES.values() if model_type in d["model_types"])
        # transformers' DeepseekV3Config has no topk_method or scoring_func: its router is always V3's
        known.setdefault("topk_method", fam["topk_methods"][0])
        known.setdefault("scoring_func", fam["scoring_func"])
        eos = config.get("eos_token_id")
        if isinstance(eos, list):
            known["eos_token_id"] = eos[0] if eos else None
        return cls(**known)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json in the layout of the real checkpoints of its family (rope at the top level)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        out.update(
            architectures=[FAMILIES[self.family]["architecture"]],
            hidden_act="silu",
            num_key_value_heads=self.num_attention_heads,
            torch_dtype="float32",
        )
        if self.rope_scaling is None:
            out.pop("rope_scaling")
        if not self.mtp_dense:
            out.pop("mtp_dense")
        return out


def _read_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Real DeepSeek-V2 configs carry `rope_theta` and `rope_scaling` at the top level;
    transformers 5 writes both inside `rope_parameters` (with `rope_type` for `type`)."""
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling")
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        scaling = dict(scaling)
        kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        if kind == "default":
            return theta, None
        if kind != "yarn":
            raise ValueError(f"rope scaling type {kind!r} is not supported; expected 'yarn' or none")
        scaling["type"] = "yarn"
        return theta, scaling
    return theta, None
