"""In-process generation with the compressed KV cache: the reference the service is checked against."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from moe_service.model.cache import LatentCache
from moe_service.model.moe import ExpertBackend
from moe_service.model.transformer import Transformer
from moe_service.engine.sampling import SamplerState, SamplingParams, sample
from moe_service.engine.tokenizer import Detokenizer, Tokenizer


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


@dataclass
class Sequence:
    """One request's state: what it asked for, what it has produced, whether it is done."""

    prompt: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    detok: Detokenizer | None = None
    output: list[int] = field(default_factory=list)
    text: str = ""  # released so far
    pending: str = ""  # decoded, held back (it may start a stop string)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | ...
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
        self.text += piece
        return piece

@dataclass
class StepOutput:
    index: int  # which prompt of the call
    token: int
    piece: str
    finish_reason: str | None


class Engine:
    """Static batching over one LatentCache: prefill every prompt in one padded step, then decode
    the unfinished rows together. `backend` moves the routed experts elsewhere (the service)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None,
                 backend: ExpertBackend | None = None) -> None:
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.args = model.args

    def _new(self, prompt: list[int], params: SamplingParams) -> Sequence:
        check_tokens(prompt, self.args.vocab_size, self.args.max_position_embeddings)
        params.validate(self.args.vocab_size)
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        return Sequence(prompt, params, self.args.eos_token_id, detok)

    def stream(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> Iterator[StepOutput]:
        """Yields each new token of every prompt as it is produced."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self._new(p, sp) for p, sp in zip(prompts, plist)]
        max_len = max(len(s.prompt) + s.params.max_new_tokens for s in seqs)
        if max_len > self.args.max_position_embeddings:
            raise ValueError(f"prompt plus max_new_tokens reaches {max_len} tokens; "
                             f"this model accepts at most {self.args.max_position_embeddings}")
        w = self.model.embed_tokens.weight
        dev = w.device
        cache = LatentCache(self.args, len(seqs), max_len, dtype=w.dtype, device=dev)
        T = max(len(s.prompt) for s in seqs)
        ids = torch.tensor([s.prompt + [0] * (T - len(s.prompt)) for s in seqs], device=dev)
        lengths = torch.tensor([len(s.prompt) for s in seqs], device=dev)
        logits = self.model(ids, cache=cache, num_new=lengths, last_only=True, backend=self.backend)
        active = list(range(len(seqs)))
        while True:
            tokens, _ = sample(logits, [seqs[b].sampler for b in active])
            for b, tok in zip(active, tokens):
                piece = seqs[b].append(tok)
                yield StepOutput(b, tok, piece, seqs[b].finish_reason)
            active = [b for b in active if not seqs[b].finished]
            if not active:
                return
            slots = torch.tensor(active, device=dev)
            start = torch.tensor([seqs[b].length - 1 for b in active], device=dev)
            ids = torch.tensor([[seqs[b].output[-1]] for b in active], device=dev)
            logits = self.model(ids, cache=cache, slots=slots, start=start, last_only=True, backend=self.backend)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Token ids (and text, with a tokenizer) of every prompt's completion."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = [Sequence(p, sp) for p, sp in zip(prompts, plist)]
        for step in self.stream(prompts, plist):
            o = outs[step.index]
            o.output.append(step.token)
            o.text += step.piece
            o.finish_reason = step.finish_reason
        return outs
