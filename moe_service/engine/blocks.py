"""Which KV cache blocks are free, whose they are, and which hold a known prefix: bookkeeping only, no
tensors (model/cache.py holds the entries).

A block is referenced by the running sequences whose tables list it. A full block whose tokens are known
is keyed by a hash of its tokens chained with the key of the block before it, so a key names a whole
prefix: two sequences with the same first 48 tokens have the same first three keys. When no sequence
references a keyed block it is kept, least recently used first out, until its memory is needed; a new
request whose prompt starts with kept blocks takes them instead of computing them again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

Key = bytes


def chain(parent: Key, tokens: list[int]) -> Key:
    """The key of a full block of `tokens` after the prefix keyed `parent` (b"" for the first block).
    16 bytes of BLAKE2b: a collision would give a request another prompt's cache, so not Python's hash."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def prefix_keys(tokens: list[int], block_size: int, limit: int | None = None, known: list[Key] = ()) -> list[Key]:
    """The keys of the full blocks of `tokens`, at most `limit` of them; `known`: the first keys, already
    worked out (only the rest are hashed)."""
    keys = list(known)
    n = len(tokens) // block_size if limit is None else min(limit, len(tokens) // block_size)
    for i in range(len(keys), n):
        keys.append(chain(keys[-1] if keys else b"", tokens[i * block_size : (i + 1) * block_size]))
    return keys[:n]


class BlockPool:
    """Blocks 1..num_blocks-1 (block 0 is the cache's padding). `prefix_caching` False: no block is ever
    kept or found by key, as if every prompt were new."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.total = num_blocks - 1
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # never keyed, or no longer
        self.refs = [0] * num_blocks
        self.key_of: list[Key | None] = [None] * num_blocks
        self.by_key: dict[Key, int] = {}
        self.kept: OrderedDict[int, None] = OrderedDict()  # keyed, unreferenced; least recently used first

    @property
    def available(self) -> int:
        """Blocks a sequence can take now: free ones and kept ones (whose prefix is then forgotten)."""
        return len(self.free) + len(self.kept)

    @property
    def used(self) -> int:
        """Blocks some running sequence references."""
        return self.total - self.available

    def match(self, keys: list[Key]) -> list[int]:
        """The blocks holding the longest run of `keys` from the first, without taking them."""
        found = []
        for key in keys if self.prefix_caching else ():
            block = self.by_key.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def take(self, blocks: list[int]) -> None:
        """References `blocks` (from `match`) for one more sequence."""
        for b in blocks:
            if self.refs[b] == 0:
                self.kept.pop(b, None)
            self.refs[b] += 1

    def allocate(self) -> int:
        """A block for one sequence: a free one, else the least recently used kept one."""
        if self.free:
            block = self.free.pop()
        elif self.kept:
            block, _ = self.kept.popitem(last=False)
            del self.by_key[self.key_of[block]]
            self.key_of[block] = None
        else:
            raise RuntimeError("no KV cache block left")  # the scheduler checks `available` first
        self.refs[block] = 1
        return block

    def publish(self, block: int, key: Key) -> None:
        """`block` is full and holds the prefix `key`: later prompts may find it. A prefix already held
        by another block stays there; this block is then freed normally when released."""
        if self.prefix_caching and self.key_of[block] is None and key not in self.by_key:
            self.key_of[block], self.by_key[key] = key, block

    def release(self, blocks: list[int]) -> None:
        """One sequence drops `blocks` (its table, in order). The last blocks go first into the kept list,
        so the ends of prefixes are forgotten before their beginnings."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self.key_of[b] is not None:
                    self.kept[b] = None
                else:
                    self.free.append(b)

    def held_keys(self) -> list[Key]:
        """Every prefix key this pool can serve now (referenced or kept)."""
        return list(self.by_key)
