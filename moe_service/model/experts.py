"""Routed experts of one MoE layer, computed batched: rows grouped per expert, one matmul chain each."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# N rows (tokens), K experts per row, S experts held (local index s), D hidden, I expert intermediate


class RoutedExperts(nn.Module):
    """A set of SwiGLU experts stored stacked: `gate_up_proj [S, 2I, D]`, `down_proj [S, D, I]`.

    In-process, local expert s is expert s. On an expert worker the local experts are whatever (layer, expert)
    replicas the placement gives it; the math is the same, which is what keeps the service exact.
    """

    def __init__(self, num_local: int, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.num_local, self.dim, self.inter_dim = num_local, dim, inter_dim
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_local, dim, inter_dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, weights: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights [N, K], local [N, K] (int, -1 = no expert) -> sum_k w*expert(x) [N, D]."""
        return self.run(x, group_pairs(weights, local, self.num_local).to(x.device))

    @torch.no_grad()
    def run(self, x: torch.Tensor, g: "Grouping") -> torch.Tensor:
        """x [N, D] and its (row, expert) pairs grouped by local index (on x's device) -> [N, D]."""
        if self._use_grouped(x):
            y = self._grouped(x[g.rows], g.counts)
        else:
            y = self._looped(x[g.rows], g.counts)
        return self.weighted_sum(x, y, g)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in."""
        return self.gate_up_proj.dtype

    @property
    def device(self) -> torch.device:
        return self.gate_up_proj.device

    @staticmethod
    def weighted_sum(x: torch.Tensor, y: torch.Tensor, g: "Grouping") -> torch.Tensor:
        """x [N, D], y [P, D] (each pair's expert output, pairs in g's order) -> sum_k w * y per row [N, D].

        Each pair's weighted output goes to its own (row, k) place in fp32, and a row's K places are
        summed in a fixed order, then cast once. An index_add_ in bf16 would round at every add and, on
        CUDA, in whichever order its atomics land: answers would differ run to run by ~1e-3."""
        N, D = x.shape
        per_pair = torch.zeros(N * g.top_k, D, dtype=torch.float32, device=x.device)
        per_pair[g.pairs] = y.float() * g.weights
        return per_pair.view(N, g.top_k, D).sum(dim=1).to(x.dtype)

    def forward_train(self, x: torch.Tensor, weights: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The same sum as `forward`, with gradients (model/train.py): the per-expert loop, which autograd
        follows, and the gate weights stay in the graph."""
        g = group_pairs(weights, local, self.num_local)
        y = self._looped(x[g.rows], g.counts)
        return torch.zeros_like(x).index_add(0, g.rows, (y * g.weights).to(x.dtype))

    def _use_grouped(self, x: torch.Tensor) -> bool:
        """One grouped GEMM per projection: in fp32 on the host, in bf16 on a CUDA device that has the
        kernel (sm90 and newer); the per-expert loop elsewhere. The kernel needs 16-byte row strides."""
        if not (_GROUPED_MM and self._aligned_for(x.dtype)):
            return False
        if x.is_cuda:
            return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
        return x.dtype == torch.float32

    def _aligned_for(self, dtype: torch.dtype) -> bool:
        per_16_bytes = 16 // torch.empty((), dtype=dtype).element_size()
        return self.dim % per_16_bytes == 0 and self.inter_dim % per_16_bytes == 0

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # one grouped GEMM per projection instead of a Python loop over experts (same math, same result)
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs)  # [P, 2I]
        gate, up = h.split(self.inter_dim, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs)  # [P, D]

    def _looped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(xs)
        start = 0
        for i, n in enumerate(counts.tolist()):  # the loop's bounds, on the host
            if n == 0:
                continue
            h = F.linear(xs[start : start + n], self.gate_up_proj[i])  # [n, 2I]
            gate, up = h.split(self.inter_dim, dim=-1)
            out[start : start + n] = F.linear(F.silu(gate) * up, self.down_proj[i])
            start += n
        return out


_GROUPED_MM = hasattr(torch, "_grouped_mm")


@dataclass
class Grouping:
    """A dispatch's (row, expert) pairs grouped by local index: what the experts' matmuls need."""

    rows: torch.Tensor  # [P] the row of each pair, pairs in local-index order
    pairs: torch.Tensor  # [P] the flat (row * K + k) place of each pair in the dispatch's [N, K]
    weights: torch.Tensor  # [P, 1] each pair's gate weight (fp32)
    counts: torch.Tensor  # [S] pairs per local expert
    top_k: int  # K, the dispatch's columns

    def to(self, device: torch.device) -> "Grouping":
        return Grouping(self.rows.to(device), self.pairs.to(device), self.weights.to(device),
                        self.counts.to(device), self.top_k)


def group_pairs(weights: torch.Tensor, local: torch.Tensor, num_local: int) -> Grouping:
    """weights [N, K], local [N, K] (-1: no expert in this column) -> the pairs grouped by local index.

    An expert worker groups on the host, where its request arrived, before moving anything to its
    device; there this costs no device sync."""
    N, K = local.shape
    flat, w = local.reshape(-1).long(), weights.reshape(-1)
    pairs = None
    if bool((flat < 0).any()):  # padding columns (a worker's share of a row): drop them
        pairs = (flat >= 0).nonzero().squeeze(1)
        flat, w = flat[pairs], w[pairs]
    order = torch.argsort(flat, stable=True)  # groups the (row, k) pairs by local index
    places = order if pairs is None else pairs[order]
    counts = torch.bincount(flat, minlength=num_local)
    return Grouping(places // K, places, w[order, None], counts, K)
