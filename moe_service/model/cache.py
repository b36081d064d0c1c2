"""The compressed MLA KV cache, paged: per token per layer only the latent and the RoPE key, kept in a pool
of fixed-size blocks that sequences take as they grow.

A sequence's block table lists its blocks in order: position p is entry p % block_size of block
table[p // block_size]. Block 0 is never handed out: table rows are padded with it, so a read past a
row's own length reads block 0 (masked out by attention) and never another sequence's tokens.

Why 16 tokens a block (vLLM's default, too): a sequence wastes at most 15 positions in its last block, a
few percent of the 50-800-token sequences this service sees; prefixes are shared in whole blocks, so a
shared system prompt of 1,000 tokens is reused up to its last 8 tokens on average; and a 2,048-token
sequence's table is 128 entries, cheap to send with every step. A read gathers a row's positions with one
index_select per layer, in plain torch on any device.
"""

from __future__ import annotations

import torch

from moe_service.model.args import ModelArgs

BLOCK_SIZE = 16

# L layers, N blocks, K tokens per block, C = kv_lora_rank + qk_rope_head_dim, B rows, P positions


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


class PagedLatentCache:
    """`kv[layer]` is `[N, K, C]`. `row_tables` [rows, blocks] gives row b blocks of its own, for callers
    that want a plain cache of `rows` sequences of up to `max_len` tokens (`for_rows`)."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int = BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 with_mtp: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs at least 2 blocks (block 0 is padding), not {num_blocks}")
        self.num_blocks, self.block_size, self.dim = num_blocks, block_size, args.kv_cache_dim
        self.kv = [torch.zeros(num_blocks, block_size, self.dim, dtype=dtype, device=device)
                   for _ in range(args.num_hidden_layers + (args.num_nextn_predict_layers if with_mtp else 0))]
        self.row_tables: torch.Tensor | None = None

    @classmethod
    def for_rows(cls, args: ModelArgs, rows: int, max_len: int, block_size: int = BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 with_mtp: bool = False) -> "PagedLatentCache":
        per_row = blocks_for(max_len, block_size)
        cache = cls(args, rows * per_row + 1, block_size, dtype, device, with_mtp)
        cache.row_tables = torch.arange(1, rows * per_row + 1, device=device).view(rows, per_row)
        return cache

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    @property
    def max_tokens(self) -> int:
        """Tokens the pool holds, block 0 aside."""
        return (self.num_blocks - 1) * self.block_size

    def positions(self, tables: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Flat indices into a layer's [N * K] entries of positions `pos` [B, P] of rows with `tables` [B, *]."""
        k = self.block_size
        return tables.gather(1, pos // k) * k + pos % k

    def write(self, layer: int, idx: torch.Tensor, values: torch.Tensor) -> None:
        """values [M, C] to the flat entries idx [M]."""
        self.kv[layer].view(-1, self.dim).index_copy_(0, idx, values)

    def read(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        """The entries at idx [B, P]: [B, P, C]."""
        return self.kv[layer].view(-1, self.dim).index_select(0, idx.reshape(-1)).view(*idx.shape, self.dim)
