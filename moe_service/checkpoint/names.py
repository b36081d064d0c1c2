"""The one table between Hugging Face checkpoint names and this project's parameter names.

Local names are those of `moe_service.model.Transformer`. They follow the Hugging Face names, except
that a layer's routed experts are stacked into `gate_up_proj [E, 2I, D]` and `down_proj [E, D, I]`
while the checkpoint stores one tensor per expert and projection.
"""

from __future__ import annotations

import re

from moe_service.model.args import ModelArgs

# local name -> Hugging Face name, for every tensor that is not a routed expert's
# ({l}: layer index, {rest}: the rest of the name, unchanged)
NAME_TABLE: dict[str, str] = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{l}.{rest}": "model.layers.{l}.{rest}",
    # a multi-token-prediction layer (DeepSeek-V3's draft) is stored as one more layer, after the main ones
    "mtp.{l}.{rest}": "model.layers.{l}.{rest}",
}

# stacked local expert parameter -> the per-expert Hugging Face tensors it is made of, in row order
EXPERT_TABLE: dict[str, tuple[str, ...]] = {
    "layers.{l}.mlp.experts.gate_up_proj": (
        "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
        "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
    ),
    "layers.{l}.mlp.experts.down_proj": ("model.layers.{l}.mlp.experts.{e}.down_proj.weight",),
}

_LAYER = re.compile(r"^(?:layers|mtp)\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def hf_name(local: str) -> str:
    """The checkpoint name of a non-expert local parameter."""
    if local in NAME_TABLE:
        return NAME_TABLE[local]
    m = _LAYER.match(local)
    if not m or ".mlp.experts." in local:
        raise KeyError(f"no checkpoint name for local parameter {local!r}")
    return "model.layers.{l}.{rest}".format(l=m.group(1), rest=m.group(2))


def expert_hf_names(layer: int, expert: int) -> dict[str, tuple[str, ...]]:
    """For one (layer, expert): the stacked parameter's local suffix -> its checkpoint tensors."""
    return {
        local.split(".")[-1]: tuple(n.format(l=layer, e=expert) for n in names)
        for local, names in EXPERT_TABLE.items()
    }


def parse_expert_name(name: str) -> tuple[int, int] | None:
    """(layer, expert) of a routed expert's checkpoint tensor, or None for every other tensor."""
    m = _HF_EXPERT.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def expected_shapes(args: ModelArgs, mtp: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this architecture holds, by checkpoint name, with its shape; with `mtp`,
    its multi-token-prediction layers' too (`model.layers.{num_hidden_layers + i}`: a decoder layer, `enorm`,
    `hnorm`, `eh_proj` and `shared_head`; their copy of the embedding, which equals the model's, is not read)."""
    D = args.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (args.vocab_size, D),
        "model.norm.weight": (D,),
    }
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, D)
    for l in range(args.num_hidden_layers):
        shapes.update(_layer_shapes(args, l))
    for l in args.mtp_layers if mtp else []:
        p = f"model.layers.{l}."
        shapes.update(_layer_shapes(args, l))
        shapes.update({p + "enorm.weight": (D,), p + "hnorm.weight": (D,), p + "eh_proj.weight": (D, 2 * D),
                       p + "shared_head.norm.weight": (D,), p + "shared_head.head.weight": (args.vocab_size, D)})
    return shapes


def _layer_shapes(args: ModelArgs, l: int) -> dict[str, tuple[int, ...]]:
    """One decoder layer's tensors."""
    D, H = args.hidden_size, args.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {}
    p = f"model.layers.{l}."
    shapes[p + "input_layernorm.weight"] = (D,)
    shapes[p + "post_attention_layernorm.weight"] = (D,)
    a = p + "self_attn."
    if args.q_lora_rank is None:
        shapes[a + "q_proj.weight"] = (H * args.qk_head_dim, D)
    else:
        shapes[a + "q_a_proj.weight"] = (args.q_lora_rank, D)
        shapes[a + "q_a_layernorm.weight"] = (args.q_lora_rank,)
        shapes[a + "q_b_proj.weight"] = (H * args.qk_head_dim, args.q_lora_rank)
        if args.attention_bias:
            shapes[a + "q_a_proj.bias"] = (args.q_lora_rank,)
    shapes[a + "kv_a_proj_with_mqa.weight"] = (args.kv_cache_dim, D)
    shapes[a + "kv_a_layernorm.weight"] = (args.kv_lora_rank,)
    shapes[a + "kv_b_proj.weight"] = (H * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank)
    shapes[a + "o_proj.weight"] = (D, H * args.v_head_dim)
    if args.attention_bias:
        shapes[a + "kv_a_proj_with_mqa.bias"] = (args.kv_cache_dim,)
        shapes[a + "o_proj.bias"] = (D,)
    m = p + "mlp."
    if args.is_moe_layer(l):
        I = args.moe_intermediate_size
        shapes[m + "gate.weight"] = (args.n_routed_experts, D)
        if args.topk_method == "noaux_tc":
            shapes[m + "gate.e_score_correction_bias"] = (args.n_routed_experts,)
        if args.n_shared_experts:
            S = I * args.n_shared_experts
            shapes[m + "shared_experts.gate_proj.weight"] = (S, D)
            shapes[m + "shared_experts.up_proj.weight"] = (S, D)
            shapes[m + "shared_experts.down_proj.weight"] = (D, S)
        for e in range(args.n_routed_experts):
            x = f"{m}experts.{e}."
            shapes[x + "gate_proj.weight"] = (I, D)
            shapes[x + "up_proj.weight"] = (I, D)
            shapes[x + "down_proj.weight"] = (D, I)
    else:
        shapes[m + "gate_proj.weight"] = (args.intermediate_size, D)
        shapes[m + "up_proj.weight"] = (args.intermediate_size, D)
        shapes[m + "down_proj.weight"] = (D, args.intermediate_size)
    return shapes
