"""One request's state as the engine carries it: what it asked for, where it is in the cache, what it has
produced, and how its client hears of it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from moe_service.engine.sampling import SamplerState, SamplingParams
from moe_service.engine.tokenizer import Detokenizer

# ("token", (id, piece, logprobs | None)) | ("finish", (reason, usage)) | ("error", (kind, message))
Event = tuple[str, object]


def check_tokens(ids: list[int], vocab_size: int, limit: int, what: str = "prompt") -> None:
    """The one check of a token sequence from a client: not empty, at most `limit` tokens, every id in
    the vocabulary. ValueError naming what was wrong and what is allowed."""
    if not ids:
        raise ValueError(f"{what} is empty; give text or at least one token id")
    if len(ids) > limit:
        raise ValueError(f"{what} has {len(ids)} tokens; this service accepts at most {limit}")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{what} has token id {bad}; token ids are in [0, {vocab_size})")


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    detok: Detokenizer | None = None
    emit: Callable[[Event], None] = lambda e: None
    deadline: float | None = None  # time.monotonic() value
    workload: int = 0  # the client's workload class (x-moe-workload), as an index the gateway defines
    id: int = 0
    output: list[int] = field(default_factory=list)
    pending: str = ""  # decoded, held back (it may start a stop string)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "deadline" | "error"
    cancelled: bool = False
    blocks: list[int] = field(default_factory=list)  # its KV cache block table while running
    computed: int = 0  # positions whose KV entries are in its blocks
    keys: list[bytes] = field(default_factory=list)  # prefix keys of its full blocks so far (engine/blocks.py)
    draft: list[int] = field(default_factory=list)  # tokens to try after its last one (engine/speculative.py)
    cached_tokens: int = 0  # prompt tokens it found in the prefix cache when first admitted
    preemptions: int = 0  # times its blocks were taken back and its tokens computed again
    sampler: SamplerState = field(init=False)
    t_start: float = field(default_factory=time.monotonic)
    t_first: float | None = None

    def __post_init__(self) -> None:
        self.sampler = SamplerState(self.params)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in the cache once the last output token is fed back."""
        return len(self.prompt) + len(self.output)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefill_target(self) -> int:
        """Positions to compute before it decodes: its prompt, or after a preemption everything up to its
        last output token (which the next decode step feeds back, as always)."""
        return self.length - 1 if self.output else len(self.prompt)

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prefill_target

    @property
    def kv_used(self) -> int:
        """Tokens it holds in the cache now."""
        return self.computed

    def append(self, token: int) -> str:
        """Record a sampled token, update the stop state, and return the text it releases. With stop
        strings, text that may be the start of one is held back until it is not (or the sequence ends);
        the text never includes the stop string itself."""
        if self.t_first is None:
            self.t_first = time.monotonic()
        self.output.append(token)
        p = self.params
        if self.detok is not None:
            self.pending += self.detok.push(token)
        if (token == self.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= p.max_new_tokens:
            self.finish_reason = "length"
        hold = 0
        if p.stop_strings and self.pending:
            # a stop string can only begin in the held-back text (everything that might start one is held)
            tail = self.pending
            hit = min((i for i in (tail.find(s) for s in p.stop_strings) if i >= 0), default=-1)
            if hit >= 0:
                self.finish_reason, self.pending = "stop", tail[:hit]
            elif not self.finished:
                hold = max((k for s in p.stop_strings for k in range(min(len(s) - 1, len(tail)), 0, -1)
                            if s.startswith(tail[-k:])), default=0)
        piece, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return piece

    def usage(self) -> dict[str, float]:
        now = time.monotonic()
        return {
            "prompt_tokens": len(self.prompt), "generated_tokens": len(self.output), "cached_tokens": self.cached_tokens,
            "time_to_first_token_s": (self.t_first - self.t_start) if self.t_first else 0.0,
            "total_time_s": now - self.t_start,
        }
