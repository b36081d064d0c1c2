"""The router of DeepSeekMoE: scores, (group-limited) top-k, weight scaling. Two families:

- DeepSeek-V2: softmax scores; top-k greedily, or within the `topk_group` groups with the best single
  expert (`group_limited_greedy`); the top-k weights are either renormalised or scaled, never both.
- DeepSeek-V3 (R1, Kimi-K2): sigmoid scores; experts are *chosen* by score + `e_score_correction_bias`
  (the auxiliary-loss-free balance), within the `topk_group` groups whose two best biased scores sum
  highest (`noaux_tc`); the chosen experts' *unbiased* scores are renormalised (`norm_topk_prob`), then
  scaled by `routed_scaling_factor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_service.model.args import ModelArgs

# T tokens, E experts, G groups, K experts per token


class Gate(nn.Module):
    """Maps tokens `[T, D]` to `(weights [T, K] fp32, experts [T, K] int64)`.

    The gateway runs this; the weights and expert ids are what travels to the expert workers.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.n_experts = args.n_routed_experts
        self.method, self.scoring = args.topk_method, args.scoring_func
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.norm_topk_prob = args.norm_topk_prob
        self.scaling = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        if self.method == "noaux_tc":  # a checkpoint tensor, kept in fp32 like the gate's weight
            self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.select(self.scores(x))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's routing score [T, E], in fp32 whatever the model dtype (so bf16 serving routes
        like fp32); training reads them for the balance loss."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def _groups(self, choice: torch.Tensor, group_score: torch.Tensor, fill: float) -> torch.Tensor:
        """`choice` [T, E] with the experts outside each token's best `topk_group` groups set to `fill`."""
        T = choice.shape[0]
        group_idx = group_score.topk(self.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_score).scatter_(1, group_idx, 1.0)  # [T, G]
        keep = group_mask.unsqueeze(-1).expand(T, self.n_group, self.n_experts // self.n_group).reshape(T, -1)
        return choice.masked_fill(~keep.bool(), fill)

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores [T, E] -> (weights [T, K] fp32, experts [T, K])"""
        T = scores.shape[0]
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()  # for choosing only
            group_score = choice.view(T, self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            experts = self._groups(choice, group_score, float("-inf")).topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, experts)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return weights * self.scaling, experts
        if self.method == "group_limited_greedy":
            scores = self._groups(scores, scores.view(T, self.n_group, -1).max(dim=-1).values, 0.0)
        weights, experts = scores.topk(self.top_k, dim=-1, sorted=False)  # [T, K]
        # DeepSeek-V2's rule: either renormalise the top-k, or scale them (never both)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.scaling
        return weights, experts
