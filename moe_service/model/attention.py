"""Multi-head Latent Attention (DeepSeek-V2) over the compressed KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moe_service.model.args import ModelArgs
from moe_service.model.cache import PagedLatentCache
from moe_service.model.layers import RMSNorm
from moe_service.model.rope import apply_rotary, softmax_scale

if TYPE_CHECKING:
    from moe_service.model.moe import StageClock

# B rows, T new tokens per row, L key positions, H heads, r kv_lora_rank, dn/dr/dv nope/rope/v head dims


@dataclass
class StepContext:
    """What every layer of one forward step shares: where each row's new tokens go and what they see."""

    rot: torch.Tensor  # [B, T, dr/2] complex rotations of the new tokens' positions
    mask: torch.Tensor  # [B, T, L] bool, True where query t of row b may attend key l
    valid: torch.Tensor  # [B, T] bool, True for real (non-padding) tokens
    num_keys: int  # L
    cache: PagedLatentCache | None = None
    start: torch.Tensor | None = None  # [B] tokens already cached per row
    num_new: torch.Tensor | None = None  # [B]
    all_valid: bool = True
    plain_causal: bool = False  # no cached prefix, no padding: the mask is exactly causal
    # made once per step so that no layer waits on the device for them (a host sync per layer):
    valid_idx: torch.Tensor | None = None  # [N] the real tokens' indices in the flat [B * T]; None if all are
    new_b: torch.Tensor | None = None  # [N] row of each new token, when the step has padding
    new_t: torch.Tensor | None = None  # [N] its place in the row
    write_idx: torch.Tensor | None = None  # [N] the cache entry of each new token (PagedLatentCache.write)
    read_idx: torch.Tensor | None = None  # [B, L] the cache entry of each row's key positions
    clock: "StageClock | None" = None  # times the step's stages, for metrics


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = args.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.dn, self.dr, self.dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        H, D, bias = self.n_heads, args.hidden_size, args.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * args.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, D, bias=bias)
        self.scale = softmax_scale(args)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = apply_rotary(q_pe, ctx.rot)

        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.dr], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c), apply_rotary(k_pe, ctx.rot)], dim=-1)  # [B, T, C]
        if ctx.cache is not None:
            new = latent.reshape(B * T, -1) if ctx.new_b is None else latent[ctx.new_b, ctx.new_t]
            ctx.cache.write(self.layer, ctx.write_idx, new)
            latent = ctx.cache.read(self.layer, ctx.read_idx)  # [B, L, C]
        L = latent.shape[1]

        # Two exact ways to the same result; pick the one with fewer flops for this step's shape.
        # Absorbing kv_b_proj into the query attends over the latent directly (cheap for decode);
        # expanding the latent into per-head keys and values is cheaper for long prefills.
        r, dn, dv = self.kv_lora_rank, self.dn, self.dv
        expand_cost = L * r * H * (dn + dv) + H * T * L * (dn + self.dr + dv)
        absorb_cost = T * H * r * (dn + dv) + H * T * L * (2 * r + self.dr)
        if absorb_cost < expand_cost:
            out = self._absorbed(q_nope, q_pe, latent, ctx.mask)
        else:
            out = self._expanded(q_nope, q_pe, latent, None if ctx.plain_causal else ctx.mask)
        return self.o_proj(out.reshape(B, T, H * dv))

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """mask None: plainly causal, which lets SDPA use its fused causal kernel."""
        B, T, H, _ = q_nope.shape
        L = latent.shape[1]
        kv = self.kv_b_proj(latent[..., : self.kv_lora_rank]).view(B, L, H, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k_pe = latent[..., self.kv_lora_rank :].unsqueeze(2).expand(B, L, H, self.dr)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, dn+dr]
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)  # [B, H, L, dn+dr]
        out = F.scaled_dot_product_attention(
            q, k, v.transpose(1, 2), attn_mask=None if mask is None else mask.unsqueeze(1),
            is_causal=mask is None, scale=self.scale,
        )  # [B, H, T, dv]
        return out.transpose(1, 2)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        r = self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.dn + self.dv, r)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]  # [H, dn, r], [H, dv, r]
        q_lat = torch.einsum("bthd,hdr->bhtr", q_nope, w_uk)
        q_abs = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1).reshape(B, H * T, -1)  # [B, H*T, C]
        # every head shares the latent keys, so heads fold into the query rows (one bmm, no copies)
        scores = torch.bmm(q_abs, latent.transpose(1, 2)).view(B, H, T, -1) * self.scale  # [B, H, T, L]
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        probs = scores.float().softmax(dim=-1).to(latent.dtype).view(B, H * T, -1)
        o_lat = torch.bmm(probs, latent[..., :r]).view(B, H, T, r)
        return torch.einsum("bhtr,hvr->bthv", o_lat, w_uv)
