"""What runs next: a policy over sequences and the KV cache's slots, with no threads and no model.

Requests wait in FIFO order until a slot is free and their KV reservation (prompt + max_new_tokens)
fits; every running sequence decodes each step; prompts prefill in chunks within a token budget, so
running streams keep flowing while a long prompt comes in.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from moe_service.engine.sampling import SamplingParams
from moe_service.engine.sequence import Sequence, check_tokens


class Rejected(ValueError):
    """A request refused at the door. `kind` maps to a gRPC status ('invalid' -> INVALID_ARGUMENT,
    'exhausted' -> RESOURCE_EXHAUSTED); `cause` is what metrics count it as."""

    def __init__(self, kind: str, message: str, cause: str = "invalid") -> None:
        super().__init__(message)
        self.kind, self.cause = kind, cause


@dataclass
class SchedulerConfig:
    max_running: int = 32  # sequences in flight at once (KV cache slots)
    max_seq_len: int = 2048  # prompt + generated tokens of one sequence
    kv_capacity_tokens: int | None = None  # tokens reservable in the cache; default slots x max_seq_len
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
    def capacity(self) -> int:
        return self.kv_capacity_tokens or self.max_running * self.max_seq_len

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
        if need > self.capacity:
            raise Rejected("exhausted", f"request needs {need} KV cache tokens; the cache holds {self.capacity}",
                           "kv_capacity")


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
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(config.max_running))[::-1]
        self.reserved_tokens = 0

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
        batch.decode = [s for s in self.running if not s.in_prefill]
        # the budget protects running streams; with none decoding, prefill goes a whole chunk at a time
        budget = c.step_token_budget if batch.decode else max(c.step_token_budget, c.prefill_chunk)
        for s in self.running:
            if s.in_prefill and budget > 0:
                n = min(c.prefill_chunk, len(s.prompt) - s.prefilled, budget)
                batch.prefill.append((s, n))
                budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """`seq` leaves: its slot and KV reservation are free for others."""
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        self.reserved_tokens -= seq.reserved
        seq.reserved = 0

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv_reserved_tokens": self.reserved_tokens, "kv_capacity_tokens": self.config.capacity,
                "kv_used_tokens": sum(s.kv_used for s in self.running)}

    def _drop_dead(self, now: float, batch: Batch) -> None:
        for s in [*self.waiting, *self.running]:
            if s.cancelled or (s.deadline is not None and now > s.deadline):
                waiting = s.slot < 0
                if waiting:
                    self.waiting.remove(s)
                self.finish(s)
                kind = "cancelled" if s.cancelled else "deadline"
                message = ("request cancelled" if s.cancelled else "deadline passed while the request was waiting"
                           if waiting else f"deadline passed after {len(s.output)} tokens")
                batch.ended.append((s, kind, message))

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            s = self.waiting[0]
            need = len(s.prompt) + s.params.max_new_tokens
            if self.reserved_tokens + need > self.config.capacity:
                break  # FIFO: the head waits for room, nobody overtakes it
            self.waiting.popleft()
            s.slot, s.reserved = self.free_slots.pop(), need
            self.reserved_tokens += need
            self.running.append(s)
