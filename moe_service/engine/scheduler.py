"""What runs next: a policy over sequences and the KV cache's blocks, with no threads and no model.

Requests wait in FIFO order until the batch has room (`max_running`) and the cache has blocks for their
prompt, less what the prefix cache already holds; every running sequence decodes each step, taking a
block whenever it fills one; prompts prefill in chunks within a token budget, so running streams keep
flowing while a long prompt comes in. When a decoding sequence needs a block and none is left, the
newest running sequence is preempted: its blocks go back, and it waits at the head of the queue to
compute its tokens again (its client sees only a delay; vLLM's recompute).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from moe_service.engine.blocks import BlockPool, prefix_keys
from moe_service.engine.sampling import SamplingParams
from moe_service.engine.sequence import Sequence, check_tokens
from moe_service.engine.speculative import Speculative
from moe_service.model.cache import BLOCK_SIZE, blocks_for


class Rejected(ValueError):
    """A request refused at the door. `kind` maps to a gRPC status ('invalid' -> INVALID_ARGUMENT,
    'exhausted' -> RESOURCE_EXHAUSTED); `cause` is what metrics count it as."""

    def __init__(self, kind: str, message: str, cause: str = "invalid") -> None:
        super().__init__(message)
        self.kind, self.cause = kind, cause


@dataclass
class SchedulerConfig:
    max_running: int = 32  # sequences in a step's batch at most
    max_seq_len: int = 2048  # prompt + generated tokens of one sequence
    # tokens the paged KV cache holds; default: max_running sequences of max_seq_len (the memory a cache of
    # one max_seq_len slot per sequence took). On a GPU, kv_memory_fraction sizes it instead.
    kv_capacity_tokens: int | None = None
    kv_memory_fraction: float | None = None  # of the device memory free once the model is loaded (CUDA)
    prefix_caching: bool = True  # keep full prompt blocks after their sequence ends, for requests that share them
    # waiting requests beyond which new ones get RESOURCE_EXHAUSTED at once; with max_running, what a
    # replica admits (a burst of 300 fits the defaults)
    max_queue: int = 512
    max_prompt_tokens: int | None = None  # default max_seq_len - 1
    max_new_tokens: int = 1024
    prefill_chunk: int = 256  # prompt tokens of one sequence per step
    step_token_budget: int = 512  # prefill tokens per step while others decode (decodes always run)
    # split a step's decode batch so one part's attention overlaps another's expert calls; None: the
    # service decides (ServiceConfig.overlap), 1 in-process
    micro_batches: int | None = None

    def fit(self, args) -> "SchedulerConfig":
        """This config for a model (ModelArgs): a sequence no longer than the model's positions."""
        self.max_seq_len = min(self.max_seq_len, args.max_position_embeddings)
        return self

    @property
    def num_blocks(self) -> int:
        """The pool's blocks, block 0 (padding) included."""
        if self.kv_capacity_tokens is not None:
            return blocks_for(self.kv_capacity_tokens) + 1
        return self.max_running * blocks_for(self.max_seq_len) + 1

    @property
    def capacity(self) -> int:
        """Tokens the cache holds."""
        return (self.num_blocks - 1) * BLOCK_SIZE

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_tokens or self.max_seq_len - 1

    def validate(self, prompt: list[int], params: SamplingParams, vocab_size: int) -> None:
        """The one check of a request against the model and these limits; Rejected says what is allowed."""
        try:
            check_tokens(prompt, vocab_size, self.prompt_limit)
        except ValueError as e:
            raise Rejected("invalid", str(e), "prompt_too_long" if len(prompt) > self.prompt_limit else "invalid") from None
        try:
            params.validate(vocab_size, self.max_new_tokens)
        except ValueError as e:
            raise Rejected("invalid", str(e)) from None
        need = len(prompt) + params.max_new_tokens
        if need > self.max_seq_len:
            raise Rejected("invalid", f"prompt ({len(prompt)}) plus max_new_tokens ({params.max_new_tokens}) is {need} "
                                      f"tokens; a sequence may hold at most {self.max_seq_len}", "prompt_too_long")
        if blocks_for(need) * BLOCK_SIZE > self.capacity:  # can never fit: not a matter of waiting
            raise Rejected("invalid", f"prompt ({len(prompt)}) plus max_new_tokens ({params.max_new_tokens}) is {need} "
                                      f"tokens; the KV cache holds at most {self.capacity} "
                                      "(scheduler.kv_capacity_tokens)", "kv_capacity")


@dataclass
class Batch:
    """One step's work: every running sequence past its prompt decodes one token; the others prefill a
    chunk of their prompt. `ended`: sequences dropped before the step (cancelled, past their deadline),
    with the kind and message their clients get."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)
    ended: list[tuple[Sequence, str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, config: SchedulerConfig, speculative: Speculative | None = None) -> None:
        self.config = config
        # an MTP layer's cache entry at a position depends on the token after it: the last block found in the
        # prefix cache is computed again, so that its last entry sees this prompt's next token
        self.mtp = speculative is not None and speculative.mtp
        # above this many decoding sequences a step verifies no draft: speculation stops paying (the bench)
        self.draft_batch = speculative.max_batch if speculative is not None else None
        self.pool = BlockPool(config.num_blocks, BLOCK_SIZE, config.prefix_caching)
        # a few blocks kept free at admission, so that sequences just admitted can grow a little before a
        # preemption is needed (vLLM's watermark)
        self.watermark = max(1, self.pool.total // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the first to preempt
        self.counts = {"prefix_query_tokens": 0, "prefix_hit_tokens": 0, "preemptions": 0}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, now: float | None = None) -> Batch:
        now = time.monotonic() if now is None else now
        batch = Batch()
        self._drop_dead(now, batch)
        self._admit()
        c = self.config
        batch.decode = self._grow([s for s in self.running if not s.in_prefill])
        # the budget protects running streams; with none decoding, prefill goes a whole chunk at a time
        budget = c.step_token_budget if batch.decode else max(c.step_token_budget, c.prefill_chunk)
        for s in self.running:
            if s.in_prefill and budget > 0:
                n = min(c.prefill_chunk, s.prefill_target - s.computed, budget)
                batch.prefill.append((s, n))
                budget -= n
        return batch

    def computed(self, seq: Sequence, n: int) -> None:
        """`n` more positions of `seq` are in its blocks: every block they filled is published under its
        prefix key, for later prompts that start the same way."""
        before = seq.computed // BLOCK_SIZE
        seq.computed += n
        full = seq.computed // BLOCK_SIZE
        if full > len(seq.keys):
            seq.keys = prefix_keys(seq.tokens, BLOCK_SIZE, full, seq.keys)
        for i in range(before, full):
            self.pool.publish(seq.blocks[i], seq.keys[i])

    def finish(self, seq: Sequence) -> None:
        """`seq` leaves: its blocks go back to the pool (the full ones are kept for reuse)."""
        if seq in self.running:
            self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []

    def stats(self) -> dict[str, int]:
        p = self.pool
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv_used_tokens": sum(s.kv_used for s in self.running), "kv_capacity_tokens": self.config.capacity,
                "kv_blocks_total": p.total, "kv_blocks_used": p.used, "kv_blocks_kept": len(p.kept),
                "kv_blocks_free": len(p.free), **self.counts}

    def _drop_dead(self, now: float, batch: Batch) -> None:
        for s in [*self.waiting, *self.running]:
            if s.cancelled or (s.deadline is not None and now > s.deadline):
                waiting = s not in self.running
                if waiting:
                    self.waiting.remove(s)
                self.finish(s)
                kind = "cancelled" if s.cancelled else "deadline"
                message = ("request cancelled" if s.cancelled else "deadline passed while the request was waiting"
                           if waiting else f"deadline passed after {len(s.output)} tokens")
                batch.ended.append((s, kind, message))

    def _admit(self) -> None:
        """FIFO: the head of the queue waits for room, nobody overtakes it."""
        pool = self.pool
        while self.waiting and len(self.running) < self.config.max_running:
            s = self.waiting[0]
            target = s.prefill_target
            # a prompt's last token is always computed (its logits give the first token); after a preemption
            # every position up to the last output token may come from the cache
            usable = target // BLOCK_SIZE if s.output else (target - 1) // BLOCK_SIZE
            if len(s.keys) < usable:
                s.keys = prefix_keys(s.tokens, BLOCK_SIZE, usable, s.keys)
            hits = pool.match(s.keys[:usable])
            if self.mtp and hits:
                hits = hits[:-1]
            need = blocks_for(target) - len(hits)
            kept_hits = sum(1 for b in hits if pool.refs[b] == 0)  # counted in `available` until taken
            if pool.available - kept_hits < need + (self.watermark if self.running else 0):
                break
            self.waiting.popleft()
            pool.take(hits)
            s.blocks = hits + [pool.allocate() for _ in range(need)]
            s.computed = len(hits) * BLOCK_SIZE
            if not s.output and not s.preemptions:
                s.cached_tokens = s.computed
                self.counts["prefix_query_tokens"] += len(s.prompt)
                self.counts["prefix_hit_tokens"] += s.computed
            self.running.append(s)

    def _grow(self, decode: list[Sequence]) -> list[Sequence]:
        """A block for every decoding sequence whose next position starts one, oldest first; when none is
        left, the newest running sequence is preempted (possibly one of these). Then room for each one's
        draft where blocks are free without preempting anyone (a draft is cut to what fits, and to what
        max_new_tokens and max_seq_len leave). Returns those still running."""
        preempted: set[Sequence] = set()
        for s in decode:
            if s in preempted or s.computed < len(s.blocks) * BLOCK_SIZE:
                continue
            while not self.pool.available and self.running[-1] is not s:
                preempted.add(self._preempt(self.running[-1]))
            if self.pool.available:
                s.blocks.append(self.pool.allocate())
            else:  # s is the newest: it waits for the others
                preempted.add(self._preempt(s))
        running = [s for s in decode if s not in preempted] if preempted else decode
        if self.draft_batch is not None and len(running) > self.draft_batch:
            for s in running:
                s.draft = []
        for s in running:
            if s.draft:
                room = min(s.params.max_new_tokens - len(s.output) - 1, self.config.max_seq_len - s.computed - 1)
                want = s.computed + 1 + min(len(s.draft), max(0, room))
                while len(s.blocks) * BLOCK_SIZE < want and self.pool.available:
                    s.blocks.append(self.pool.allocate())
                s.draft = s.draft[: max(0, min(want, len(s.blocks) * BLOCK_SIZE) - s.computed - 1)]
        return running

    def trim(self, seq: Sequence) -> None:
        """After a speculative step: the blocks past what `seq` computed and its next position (they held
        only rejected drafts, and were never published) go back to the pool."""
        keep = blocks_for(seq.computed + 1)
        if len(seq.blocks) > keep:
            self.pool.release(seq.blocks[keep:])
            del seq.blocks[keep:]

    def _preempt(self, s: Sequence) -> Sequence:
        self.finish(s)
        s.computed = 0
        s.preemptions += 1
        self.counts["preemptions"] += 1
        self.waiting.appendleft(s)
        return s
