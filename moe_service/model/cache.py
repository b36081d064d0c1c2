"""The compressed MLA KV cache: per token per layer only the latent and the RoPE key."""

from __future__ import annotations

import torch

from moe_service.model.args import ModelArgs

# L layers, S sequence slots, M max tokens per slot, C = kv_lora_rank + qk_rope_head_dim


class LatentCache:
    """`kv[layer]` is `[S, M, C]`; a sequence owns one slot and its tokens sit at their positions."""

    def __init__(
        self, args: ModelArgs, num_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_slots, self.max_len, self.dim = num_slots, max_len, args.kv_cache_dim
        self.kv = [
            torch.zeros(num_slots, max_len, self.dim, dtype=dtype, device=device)
            for _ in range(args.num_hidden_layers)
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def write(self, layer: int, slots: torch.Tensor, start: torch.Tensor, values: torch.Tensor,
              b: torch.Tensor | None = None, t: torch.Tensor | None = None) -> None:
        """values [B, T, C]. One token per row (T == 1): row b's goes to slot slots[b] at start[b].
        Otherwise the (row b[i], token t[i]) pairs given, to slots[b[i]] at start[b[i]] + t[i]."""
        if b is None:
            self.kv[layer][slots, start] = values[:, 0]
        else:
            self.kv[layer][slots[b], start[b] + t] = values[b, t]

    def read(self, layer: int, slots: torch.Tensor, length: int, identity: bool = False) -> torch.Tensor:
        """The first `length` positions of each row's slot: [B, length, C]. `identity`: row b is slot b
        for every slot, so no gather is needed."""
        kv = self.kv[layer]
        return kv[:, :length] if identity else kv[slots, :length]

    def clear(self, slot: int) -> None:
        for t in self.kv:
            t[slot].zero_()
