"""FP8 block-quantized weights, DeepSeek-V3's format: `float8_e4m3fn` values and one float32 scale per
128 x 128 block (`weight_scale_inv`: the factor that dequantizes), the edge blocks partial.

Weight-only: a weight is dequantized to the compute dtype right before its matmul, and the activations
stay in the compute dtype, so a model computes exactly what it would on the dequantized weights.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from moe_service.model.experts import Grouping, RoutedExperts

# R rows (out features), C columns (in features), S experts held, D hidden, I expert intermediate

BLOCK = 128
FP8 = torch.float8_e4m3fn
_SCRATCH = threading.local()  # FP8Experts' dequantization buffers
FP8_MAX = 448.0  # the largest finite e4m3fn value
# every e4m3fn code's value, and every pair of codes' (two adjacent bytes read as one little-endian int16,
# low byte first): a gather of pairs from this 512 KiB table (in the output's dtype) converts about 5x
# faster than .to(float32) on a CPU (docs/performance.md, "FP8 experts")
_VALUES = torch.arange(256, dtype=torch.uint8).view(FP8).to(torch.float32)
_PAIRS = {torch.float32: torch.stack(torch.meshgrid(_VALUES, _VALUES, indexing="xy"), dim=-1).reshape(65536, 2)}


def _pairs(dtype: torch.dtype) -> torch.Tensor:
    """The pair table in `dtype` (every e4m3 value is exact in bf16 and fp16 too)."""
    if dtype not in _PAIRS:
        _PAIRS[dtype] = _PAIRS[torch.float32].to(dtype)
    return _PAIRS[dtype]


def scale_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """The scale tensor's shape for a weight of `shape` [R, C]: one per 128 x 128 block, edges partial."""
    R, C = shape
    return math.ceil(R / BLOCK), math.ceil(C / BLOCK)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> (values [R, C] float8_e4m3fn, scales [ceil(R/128), ceil(C/128)] float32): each block
    scaled so its largest magnitude is 448, as DeepSeek-V3's checkpoints are."""
    R, C = w.shape
    Rb, Cb = scale_grid(w.shape)
    padded = F.pad(w.float(), (0, Cb * BLOCK - C, 0, Rb * BLOCK - R))
    amax = padded.view(Rb, BLOCK, Cb, BLOCK).abs().amax(dim=(1, 3))
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (padded.view(Rb, BLOCK, Cb, BLOCK) / scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(Rb * BLOCK, Cb * BLOCK)[:R, :C].contiguous(), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """values [R, C] fp8 and their block scales -> [R, C] in `out`'s dtype (float32 if none given).
    `index`: a reusable int32 buffer of at least R * C / 2 elements (else one is allocated)."""
    R, C = q.shape
    if out is None:
        out = torch.empty(R, C, dtype=torch.float32, device=q.device)
    if q.is_cuda:  # the device converts at memory speed
        out.copy_(q)
    elif C % 2 == 0 and q.is_contiguous() and out.is_contiguous():
        n = R * C // 2
        pairs = index[:n] if index is not None else torch.empty(n, dtype=torch.int32)
        pairs.copy_(q.view(torch.int16).reshape(-1)).bitwise_and_(0xFFFF)  # sign-extended: keep the low 16 bits
        torch.index_select(_pairs(out.dtype), 0, pairs, out=out.view(-1, 2))
    else:
        out.copy_(_VALUES[q.view(torch.uint8).int()])
    Rf, Cf = R // BLOCK * BLOCK, C // BLOCK * BLOCK
    Rb, Cb = Rf // BLOCK, Cf // BLOCK
    # whole blocks at once, then the partial column, row and corner at the edges
    out[:Rf, :Cf].view(Rb, BLOCK, Cb, BLOCK).mul_(scales[:Rb, :Cb].view(Rb, 1, Cb, 1))
    if Cf < C:
        out[:Rf, Cf:].view(Rb, BLOCK, C - Cf).mul_(scales[:Rb, Cb].view(Rb, 1, 1))
    if Rf < R:
        out[Rf:, :Cf].view(R - Rf, Cb, BLOCK).mul_(scales[Rb, :Cb].view(1, Cb, 1))
        if Cf < C:
            out[Rf:, Cf:].mul_(scales[Rb, Cb])
    return out


class FP8Experts(nn.Module):
    """Routed experts kept in FP8 (about a quarter of float32's bytes, half of bf16's) and computed in
    `dtype`: the projections of the experts a call uses are dequantized one expert at a time into reused
    buffers. gate and up are quantized apart, as the checkpoints store them: `gate_up_scale [S, 2, Ri, Cd]`,
    `down_scale [S, Rd, Ci]`."""

    def __init__(self, num_local: int, dim: int, inter_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_local, self.dim, self.inter_dim, self.dtype = num_local, dim, inter_dim, dtype
        def param(*shape: int, dtype: torch.dtype = torch.float32) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.gate_up_proj = param(num_local, 2 * inter_dim, dim, dtype=FP8)
        self.down_proj = param(num_local, dim, inter_dim, dtype=FP8)
        self.gate_up_scale = param(num_local, 2, *scale_grid((inter_dim, dim)))
        self.down_scale = param(num_local, *scale_grid((dim, inter_dim)))

    @property
    def device(self) -> torch.device:
        return self.gate_up_proj.device

    def _scratch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_up [2I, D], down [D, I]) in the compute dtype, and the index buffer dequantizing uses: one
        set per thread and shape for every layer's module (a thread computes one expert at a time), so a
        call allocates nothing of the weights' size and the layers share the memory."""
        key = (self.inter_dim, self.dim, self.dtype, self.device)
        buffers = getattr(_SCRATCH, "buffers", None)
        if buffers is None:
            buffers = _SCRATCH.buffers = {}
        if key not in buffers:
            buffers[key] = (torch.empty(2 * self.inter_dim, self.dim, dtype=self.dtype, device=self.device),
                            torch.empty(self.dim, self.inter_dim, dtype=self.dtype, device=self.device),
                            torch.empty(self.dim * self.inter_dim // 2 + 1, dtype=torch.int32))
        return buffers[key]

    @torch.no_grad()
    def weights(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local expert s's (gate_up [2I, D], down [D, I]) in the compute dtype, in the reused buffers."""
        gate_up, down, index = self._scratch()
        I = self.inter_dim
        dequantize(self.gate_up_proj[s, :I], self.gate_up_scale[s, 0], gate_up[:I], index)
        dequantize(self.gate_up_proj[s, I:], self.gate_up_scale[s, 1], gate_up[I:], index)
        dequantize(self.down_proj[s], self.down_scale[s], down, index)
        return gate_up, down

    @torch.no_grad()
    def forward(self, x: torch.Tensor, weights: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        from moe_service.model.experts import group_pairs

        return self.run(x, group_pairs(weights, local, self.num_local).to(x.device))

    @torch.no_grad()
    def run(self, x: torch.Tensor, g: Grouping) -> torch.Tensor:
        """x [N, D] in the compute dtype -> [N, D], as RoutedExperts.run on the dequantized weights."""
        xs = x[g.rows]
        y = torch.empty_like(xs)
        start = 0
        for s, n in enumerate(g.counts.tolist()):  # the loop's bounds, on the host
            if n == 0:
                continue
            gate_up, down = self.weights(s)
            h = F.linear(xs[start : start + n], gate_up)
            gate, up = h.split(self.inter_dim, dim=-1)
            y[start : start + n] = F.linear(F.silu(gate) * up, down)
            start += n
        return RoutedExperts.weighted_sum(x, y, g)

    @classmethod
    def from_dense(cls, experts: RoutedExperts) -> "FP8Experts":
        """The same experts block-quantized (the `quantize: fp8` setting, for a bf16/fp32 checkpoint)."""
        out = cls(experts.num_local, experts.dim, experts.inter_dim, experts.gate_up_proj.dtype,
                  experts.gate_up_proj.device)
        I = experts.inter_dim
        for s in range(experts.num_local):
            for half, rows in enumerate((slice(0, I), slice(I, 2 * I))):
                q, sc = quantize(experts.gate_up_proj.data[s, rows])
                out.gate_up_proj.data[s, rows], out.gate_up_scale.data[s, half] = q, sc
            out.down_proj.data[s], out.down_scale.data[s] = quantize(experts.down_proj.data[s])
        return out
