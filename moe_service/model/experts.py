"""Routed experts of one MoE layer, computed batched: rows grouped per expert, one matmul chain each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# N rows (tokens), K experts per row, S hosted expert slots, D hidden, I expert intermediate


class RoutedExperts(nn.Module):
    """A set of SwiGLU experts stored stacked: `gate_up_proj [S, 2I, D]`, `down_proj [S, D, I]`.

    In-process, slot s is expert s. On an expert worker the slots are whatever (layer, expert)
    replicas the placement gives it; the math is the same, which is what keeps the service exact.
    """

    def __init__(self, num_slots: int, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.num_slots, self.dim, self.inter_dim = num_slots, dim, inter_dim
        self.gate_up_proj = nn.Parameter(torch.empty(num_slots, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_slots, dim, inter_dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights [N, K], slots [N, K] (int, -1 = no expert) -> sum_k w*expert(x) [N, D]."""
        N, K = slots.shape
        out = torch.zeros_like(x)
        flat = slots.reshape(-1)
        order = torch.argsort(flat, stable=True)  # groups the (row, k) pairs by slot; -1 first
        counts = torch.bincount(flat + 1, minlength=self.num_slots + 1).tolist()
        rows = order // K
        w = weights.reshape(-1)[order]
        start = counts[0]  # skip the padding pairs (slot -1)
        for slot, n in enumerate(counts[1:]):
            if n == 0:
                continue
            idx = rows[start : start + n]
            h = F.linear(x[idx], self.gate_up_proj[slot])  # [n, 2I]
            gate, up = h.split(self.inter_dim, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[slot])  # [n, D]
            out.index_add_(0, idx, (y * w[start : start + n, None]).to(x.dtype))
            start += n
        return out
