"""Sampling parameters and a sampler whose result for a row never depends on the other rows, nor on how
many tokens of its sequence a step computes: the token at output position i is
argmax(p / E) with E ~ Exp(1) drawn from (seed, i) (the Gumbel-max trick: exactly a draw from p), so a
speculative step that verifies several positions at once draws the very tokens plain decoding would."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
MAX_SAMPLES = 16  # samples of one prompt (a request's n)
MAX_REQUEST_ID = 128  # characters of a client's request id


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # report the chosen token's log-probability and this many alternatives

    def validate(self, vocab_size: int, max_new_tokens_limit: int | None = None) -> None:
        """Raises ValueError naming the field and what is allowed."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise ValueError(f"max_new_tokens is {self.max_new_tokens}; this service allows at most {max_new_tokens_limit}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE or self.temperature != self.temperature:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k must be in [0, vocab_size={vocab_size}], got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise ValueError(f"stop_token_ids has {t}; token ids are in [0, {vocab_size})")


@dataclass
class SamplerState:
    """One sequence's sampler: its parameters and its seed (drawn when the request gives none). The noise
    of output position i comes from (seed, i) alone, on the logits' device (a GPU draws other numbers)."""

    params: SamplingParams
    seed: int = field(init=False)
    generator: torch.Generator | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        seed = self.params.seed
        self.seed = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())

    def generator_at(self, device: torch.device, position: int) -> torch.Generator:
        """The random stream of output position `position`."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        # mixed so that nearby (seed, position) pairs give unrelated streams
        self.generator.manual_seed((self.seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % 2**63)
        return self.generator


Logprobs = tuple[float, list[tuple[int, float]]]  # the chosen token's, and the top (token, logprob) pairs


def sample(logits: torch.Tensor, states: list[SamplerState],
           positions: list[int]) -> tuple[list[int], list[Logprobs | None]]:
    """logits [B, V] -> one token per row, and for each row that asks (params.logprobs) its log-probabilities.
    Row b is output position `positions[b]` of the sequence `states[b]` samples for, and uses only its own
    logits and the noise of (seed, position). Log-probabilities are the model's distribution, before
    temperature and top-p/top-k. Everything stays on the logits' device until the copies to the host at the end."""
    chosen = logits.argmax(dim=-1)  # [B] greedy
    for b, st in enumerate(states):
        p = st.params
        if p.temperature == 0.0:
            continue
        row = logits[b].float() / p.temperature
        if p.top_k:
            kth = row.topk(p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = row.softmax(dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        noise = torch.empty_like(probs).exponential_(generator=st.generator_at(logits.device, positions[b]))
        chosen[b] = (probs / noise).argmax()
    want = [b for b, st in enumerate(states) if st.params.logprobs is not None]
    if not want:
        return chosen.tolist(), [None] * len(states)
    rows = torch.tensor(want, device=logits.device)
    lp = logits[rows].float().log_softmax(dim=-1)
    k = max(states[b].params.logprobs for b in want)
    top = lp.topk(k, dim=-1)
    # one more copy to the host for them all: per asking row its chosen logprob, k logprobs and k ids
    # (ids as float32 are exact below 2^24, far above any vocabulary)
    packed = torch.cat([lp.gather(1, chosen[rows, None]), top.values, top.indices.float()], dim=1)
    tokens, packed = chosen.tolist(), packed.tolist()
    out: list[Logprobs | None] = [None] * len(states)
    for b, row in zip(want, packed):
        n = states[b].params.logprobs
        out[b] = (row[0], [(int(row[1 + k + j]), row[1 + j]) for j in range(n)])
    return tokens, out
