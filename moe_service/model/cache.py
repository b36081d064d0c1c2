"""The compressed MLA KV cache: per token per layer only the latent and the RoPE key."""

from __future__ import annotations

import torch

from moe_service.model.args import ModelArgs

# L layers, S sequence slots, M max tokens per slot, C = kv_lora_rank + qk_rope_head_dim


class LatentCache:
    """`kv[layer]` is `[S, M, C]`; a sequence owns one slot and its tokens sit at their positions."""

    def __init__(
        self, args: ModelArgs, num_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_slots, self.max_len, self.dim = num_slots, max_len, args.kv_cache_dim
        self.kv = [
            torch.zeros(num_slots, max_len, self.dim, dtype=dtype, device=device)
            for _ in range(args.num_hidden_layers)
        ]

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype = torch.float32) -> int:
        return args.num_hidden_layers * args.kv_cache_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def write(self, layer: int, slots: torch.Tensor, start: torch.Tensor, num_new: torch.Tensor,
              values: torch.Tensor) -> None:
        """values [B, T, C]: row b's first num_new[b] tokens go to slot slots[b] at start[b]..."""
        B, T, _ = values.shape
        if T == 1:  # decode: one token per row
            self.kv[layer][slots, start] = values[:, 0]
            return
        valid = torch.arange(T, device=values.device)[None, :] < num_new[:, None]
        b, t = valid.nonzero(as_tuple=True)
        self.kv[layer][slots[b], start[b] + t] = values[b, t]

    def read(self, layer: int, slots: torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` positions of each row's slot: [B, length, C]."""
        kv = self.kv[layer]
        B = slots.shape[0]
        if B == kv.shape[0] and bool((slots == torch.arange(B)).all()):
            return kv[:, :length]  # the common case needs no gather
        return kv[slots, :length]

    def clear(self, slot: int) -> None:
        for t in self.kv:
            t[slot].zero_()
