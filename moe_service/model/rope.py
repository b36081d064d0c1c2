"""Rotary position embedding for MLA's decoupled key, with DeepSeek's YaRN scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_service.model.args import ModelArgs


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(args: ModelArgs) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN is on."""
    scale = args.qk_head_dim**-0.5
    rs = args.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


def _yarn_inv_freq(args: ModelArgs, dim: int) -> tuple[torch.Tensor, float]:
    rs = args.rope_scaling or {}
    base = args.rope_theta
    factor = rs.get("factor") or args.max_position_embeddings / rs["original_max_position_embeddings"]
    original = rs["original_max_position_embeddings"]
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the frequency is extrapolated (high frequencies)
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


class Rotary(nn.Module):
    """Produces complex rotations `[..., rope_dim/2]` for given positions."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim = args.qk_rope_head_dim
        if args.rope_scaling:
            inv_freq, self.attention_factor = _yarn_inv_freq(args, dim)
        else:
            inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_factor = 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # positions [B, T] -> rotations [B, T, rope/2] (complex64)
        freqs = positions[..., None].float() * self.inv_freq
        return torch.polar(torch.full_like(freqs, self.attention_factor), freqs)


def apply_rotary(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of `x` [B, T, (H,) rope] by `rot` [B, T, rope/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    if xc.dim() == 4:  # heads axis
        rot = rot.unsqueeze(2)
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)
