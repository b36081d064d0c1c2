"""Training the model code itself: the forward the service runs, with gradients, plus DeepSeek-V2's
expert-level balance loss. Used to train the embedded `coder` checkpoint (`moe-service train`, moe_service/coder/train.py).

The inference path is untouched: `Transformer.forward` stays under inference_mode and the routed experts
under no_grad; this forward walks the same modules with the same math (the grouped kernel is replaced by
its per-expert loop, which autograd follows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_service.model.transformer import Transformer


def balance_loss(scores: torch.Tensor, experts: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss, sum_i f_i * P_i: f_i is the share of routed slots expert i
    took, times E (1 when even), and P_i its mean routing probability; 1 when routing is even. scores [T, E]."""
    T, E = scores.shape
    f = torch.bincount(experts.reshape(-1), minlength=E).float() * E / (top_k * T)
    return (f * scores.mean(dim=0)).sum()


def forward_train(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """ids [B, T] -> (logits [B, T, V], the mean balance loss over MoE layers, each MoE layer's expert ids
    [B*T, K] for routing statistics)."""
    ctx = model.context(ids)
    x = model.embed_tokens(ids)
    aux = x.new_zeros(())
    routes = []
    for layer in model.layers:
        x = layer.attention_block(x, ctx)
        h = layer.ffn_input(x, ctx)
        if layer.is_moe:
            moe = layer.mlp
            scores = moe.gate.scores(h)
            weights, experts = moe.gate.select(scores)
            y = moe.experts.forward_train(h, weights, experts)
            if moe.shared_experts is not None:
                y = y + moe.shared_experts(h)
            aux = aux + balance_loss(scores, experts, moe.gate.top_k)
            routes.append(experts.detach())
        else:
            y = layer.mlp(h)
        x = layer.add_ffn_output(x, y, ctx)
    n_moe = max(1, len(routes))
    return model.logits(x), aux / n_moe, routes


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts ids[t + 1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
