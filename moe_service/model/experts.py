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
        # the grouped kernel needs every row stride to be a multiple of 16 bytes (fp32: dims % 4 == 0)
        self._aligned = dim % 4 == 0 and inter_dim % 4 == 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights [N, K], slots [N, K] (int, -1 = no expert) -> sum_k w*expert(x) [N, D]."""
        N, K = slots.shape
        flat, w = slots.reshape(-1).long(), weights.reshape(-1)
        pairs = None
        if bool((flat < 0).any()):  # padding columns (a worker's share of a row): drop them
            pairs = (flat >= 0).nonzero().squeeze(1)
            flat, w = flat[pairs], w[pairs]
        order = torch.argsort(flat, stable=True)  # groups the (row, k) pairs by slot
        rows = (order if pairs is None else pairs[order]) // K
        w = w[order, None]
        counts = torch.bincount(flat, minlength=self.num_slots)
        if _GROUPED_MM and x.device.type == "cpu" and x.dtype == torch.float32 and self._aligned:
            y = self._grouped(x[rows], counts)
        else:
            y = self._looped(x[rows], counts)
        return torch.zeros_like(x).index_add_(0, rows, (y * w).to(x.dtype))

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # one grouped GEMM per projection instead of a Python loop over experts (same math, same result)
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs)  # [P, 2I]
        gate, up = h.split(self.inter_dim, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs)  # [P, D]

    def _looped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(xs)
        start = 0
        for slot, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            h = F.linear(xs[start : start + n], self.gate_up_proj[slot])  # [n, 2I]
            gate, up = h.split(self.inter_dim, dim=-1)
            out[start : start + n] = F.linear(F.silu(gate) * up, self.down_proj[slot])
            start += n
        return out


_GROUPED_MM = hasattr(torch, "_grouped_mm")
