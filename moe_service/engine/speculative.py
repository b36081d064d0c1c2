"""Speculative decoding: a draft proposes a sequence's next tokens, and one step of the model verifies them
all, so each of the step's expert round trips carries 1 + (accepted tokens) tokens of the sequence.

The draft is the model's multi-token-prediction (MTP) layer (DeepSeek-V3's: `Transformer.draft`), or for
tests and benchmarks any function of the sequence (`propose`). A draft is accepted as long as it equals the
token the sampler draws at that position from the verification's logits (engine/sampling.py draws position
i's token from (seed, i) alone), so output with speculation is the output without it, token for token,
greedy or sampled; the draft only decides how many tokens a step yields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

MAX_TOKENS = 8  # draft tokens per step


@dataclass(frozen=True)
class Speculative:
    tokens: int  # draft tokens per step (fewer where max_new_tokens or the cache leave less room)
    # the draft: None for the model's MTP layer; else (sequence, k) -> up to k token ids to try next
    propose: Callable[[Any, int], list[int]] | None = None
    # above this many decoding sequences a step verifies no draft (the draft still runs, keeping its cache):
    # where verifying extra rows costs more than the round trips it saves; None: always speculate
    max_batch: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.tokens <= MAX_TOKENS:
            raise ValueError(f"speculative.tokens must be in [1, {MAX_TOKENS}], got {self.tokens}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise ValueError(f"speculative.max_batch must be a positive integer, got {self.max_batch!r}")

    @property
    def mtp(self) -> bool:
        return self.propose is None

    @classmethod
    def from_setting(cls, setting: dict | None, args) -> "Speculative | None":
        """The service's `speculative` setting ({method: mtp, tokens: k}), checked against the model."""
        if not setting:
            return None
        unknown = sorted(set(setting) - {"method", "tokens", "max_batch"})
        if unknown:
            raise ValueError(f"speculative has unknown keys {unknown}; it takes method, tokens and max_batch")
        if setting.get("method", "mtp") != "mtp":
            raise ValueError(f"speculative.method must be 'mtp' (the model's multi-token-prediction layer), "
                             f"got {setting['method']!r}")
        if not args.num_nextn_predict_layers:
            raise ValueError(f"speculative (method mtp) needs a model with a multi-token-prediction layer; "
                             f"{args.name!r} has none (num_nextn_predict_layers 0)")
        tokens = setting.get("tokens", 1)
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            raise ValueError(f"speculative.tokens must be an integer in [1, {MAX_TOKENS}], got {tokens!r}")
        return cls(tokens, max_batch=setting.get("max_batch"))


def accepted(draft: list[int], drawn: list[int]) -> int:
    """How many draft tokens a step keeps: those equal to the token drawn at their position, up to the
    first that is not. `drawn` has one token more than `draft` (the position after the last draft)."""
    n = 0
    while n < len(draft) and draft[n] == drawn[n]:
        n += 1
    return n
