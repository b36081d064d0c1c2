"""The routed experts' sum over a row's K experts: in float32 whatever the serving dtype, in a fixed order,
cast once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_service.model.experts import RoutedExperts

# N rows, K experts per row, S local experts, D hidden, I expert intermediate
N, K, S, D, I = 24, 6, 8, 64, 32


def _experts(dtype: torch.dtype) -> RoutedExperts:
    m = RoutedExperts(S, D, I)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.gate_up_proj.copy_(torch.randn(m.gate_up_proj.shape, generator=g) * 0.2)
        m.down_proj.copy_(torch.randn(m.down_proj.shape, generator=g) * 0.2)
    return m.to(dtype)


def _inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g).to(dtype)
    local = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(N)])
    local[::5, -1] = -1  # a worker's share of a row leaves some columns empty
    w = torch.rand(N, K, generator=g)
    return x, w, local


def _reference(m: RoutedExperts, x: torch.Tensor, w: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Each expert on its rows (ascending, as one batch), each pair weighted in float32 in its (row, k)
    place, a row's K places summed, one cast."""
    per_pair = torch.zeros(N, K, D)
    for s in range(S):
        rows, cols = (local == s).nonzero(as_tuple=True)
        if rows.numel():
            h = F.linear(x[rows], m.gate_up_proj[s])
            gate, up = h.split(I, dim=-1)
            y = F.linear(F.silu(gate) * up, m.down_proj[s])
            per_pair[rows, cols] = y.float() * w[rows, cols, None]
    return per_pair.sum(dim=1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_sum_accumulates_in_float32_and_casts_once(dtype):
    m = _experts(dtype)
    x, w, local = _inputs(dtype)
    with torch.no_grad():
        got = m(x, w, local)
        want = _reference(m, x, w, local)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    if dtype == torch.bfloat16:  # the old way (rounding at every add) is not what this computes
        per_pair_bf16 = torch.zeros_like(x)
        for k in range(K):
            for n in range(N):
                s = int(local[n, k])
                if s >= 0:
                    h = F.linear(x[n : n + 1], m.gate_up_proj[s])
                    gate, up = h.split(I, dim=-1)
                    per_pair_bf16[n] += (F.linear(F.silu(gate) * up, m.down_proj[s])[0] * w[n, k]).to(dtype)
        assert not torch.equal(per_pair_bf16, want)
