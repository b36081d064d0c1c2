"""The router of DeepSeekMoE: softmax scores, (group-limited) top-k, weight scaling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_service.model.args import ModelArgs


class Gate(nn.Module):
    """Maps tokens `[T, D]` to `(weights [T, K] fp32, experts [T, K] int64)`.

    The gateway runs this; the weights and expert ids are what travels to the expert workers.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.n_experts = args.n_routed_experts
        self.method = args.topk_method
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.norm_topk_prob = args.norm_topk_prob
        self.scaling = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.select(self.scores(x))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's routing probability [T, E], in fp32 whatever the model dtype (so bf16 serving
        routes like fp32); training reads them for the balance loss."""
        return F.linear(x.float(), self.weight.float()).softmax(dim=-1)

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "group_limited_greedy":
            T = scores.shape[0]
            group_scores = scores.view(T, self.n_group, -1).max(dim=-1).values  # [T, G]
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            score_mask = group_mask.unsqueeze(-1).expand(T, self.n_group, self.n_experts // self.n_group)
            scores = scores.masked_fill(~score_mask.reshape(T, -1).bool(), 0.0)
        weights, experts = scores.topk(self.top_k, dim=-1, sorted=False)  # [T, K]
        # DeepSeek-V2's rule: either renormalise the top-k, or scale them (never both)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.scaling
        return weights, experts
