"""The engine: continuous batching over the compressed KV cache, one step at a time.

`step()` is the one generation loop's body: the scheduler decides what runs, the runner runs it, and
the results are applied here (tokens appended and sent to their clients, finished sequences released).
In-process, `Engine(model).generate(prompts, params)` is the reference the service is checked against;
the gateway runs the same engine with its routed experts remote, stepped by `EngineLoop`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from moe_service.engine.runner import ModelRunner, Outcome, StepDispatcher
from moe_service.engine.sampling import Logprobs, SamplingParams
from moe_service.engine.scheduler import Rejected, Scheduler, SchedulerConfig
from moe_service.engine.sequence import Event, Sequence
from moe_service.engine.speculative import Speculative
from moe_service.engine.tokenizer import Tokenizer
from moe_service.model.cache import BLOCK_SIZE, PagedLatentCache
from moe_service.model.transformer import Transformer


@dataclass
class StepStats:
    decode_rows: int = 0
    prefill_rows: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the cause of each micro-batch that failed
    drafted: int = 0  # draft tokens verified (speculative decoding)
    accepted: int = 0  # ... and kept
    outcomes: list[Outcome] = field(default_factory=list)  # each micro-batch's stages and dispatch record


@dataclass
class StepOutput:
    index: int  # which prompt of the call
    token: int
    piece: str
    finish_reason: str | None
    logprobs: Logprobs | None = None  # with params.logprobs


class Engine:
    """`config` sizes the cache and the batch; without one (the in-process reference), each `generate` or
    `stream` call gets a cache sized for its prompts. `dispatchers` runs the routed experts elsewhere
    (ModelRunner); `speculative` drafts and verifies several tokens per step (engine/speculative.py)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, config: SchedulerConfig | None = None,
                 dispatchers: Callable[[], StepDispatcher] | None = None, workload_rows: bool = False,
                 speculative: Speculative | None = None) -> None:
        if speculative is not None and speculative.mtp and not len(model.mtp):
            raise ValueError("speculative (method mtp) needs the model's multi-token-prediction layer: load it "
                             "with load_model(..., with_mtp=True)")
        self.model, self.tokenizer, self.args = model, tokenizer, model.args
        self.dispatchers, self.workload_rows, self.spec = dispatchers, workload_rows, speculative
        self.sized_per_call = config is None
        self.lock = threading.Lock()  # the inbox: add() from any thread, step() on one
        self.inbox: deque[Sequence] = deque()
        self.ids = itertools.count(1)
        self._size(config or SchedulerConfig(max_running=1, max_seq_len=1))

    def _size(self, config: SchedulerConfig) -> None:
        self.config = config.fit(self.args)
        w = self.model.embed_tokens.weight
        if config.kv_memory_fraction is not None and config.kv_capacity_tokens is None and w.is_cuda:
            free, _ = torch.cuda.mem_get_info(w.device)
            per_token = self.args.num_hidden_layers * self.args.kv_cache_dim * w.element_size()
            config.kv_capacity_tokens = int(free * config.kv_memory_fraction) // per_token // BLOCK_SIZE * BLOCK_SIZE
        mtp = self.spec is not None and self.spec.mtp
        self.cache = PagedLatentCache(self.args, config.num_blocks, BLOCK_SIZE, dtype=w.dtype, device=w.device,
                                      with_mtp=mtp)
        self.scheduler = Scheduler(config, self.spec)
        self.runner = ModelRunner(self.model, self.cache, self.dispatchers, config.micro_batches or 1,
                                  self.workload_rows, self.spec)

    # ---- requests (any thread) ---------------------------------------------------------------

    def add(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None] = lambda e: None,
            timeout_s: float | None = None, workload: int = 0) -> Sequence:
        c = self.config
        c.validate(prompt, params, self.args.vocab_size)
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        seq = Sequence(prompt, params, self.args.eos_token_id, detok, emit,
                       time.monotonic() + timeout_s if timeout_s else None, workload, next(self.ids))
        with self.lock:
            if len(self.inbox) + len(self.scheduler.waiting) >= c.max_queue:
                raise Rejected("exhausted", f"the waiting queue is full ({c.max_queue} requests waiting, "
                                            f"{c.max_running} running: scheduler.max_queue and "
                                            "scheduler.max_running)", "queue_full")
            self.inbox.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True  # acted on at the next step

    @property
    def has_work(self) -> bool:
        return bool(self.inbox) or self.scheduler.has_work

    def stats(self) -> dict[str, int]:
        s = self.scheduler.stats()
        s["waiting"] += len(self.inbox)
        return s

    # ---- one step (one thread) ----------------------------------------------------------------

    def step(self) -> StepStats:
        t0 = time.perf_counter()
        with self.lock:
            while self.inbox:
                self.scheduler.add(self.inbox.popleft())
        batch = self.scheduler.schedule()
        for s, kind, message in batch.ended:
            s.finish_reason = kind
            s.emit(("error", (kind, message)))
        outcomes = self.runner.run(batch) if batch else []
        now = time.monotonic()
        for o in outcomes:
            if o.error is not None:
                self._failed(o, now)
                continue
            for s, token, logprobs in o.tokens:  # one at a time: a stop inside a speculative run ends it there
                if not s.finished:
                    s.emit(("token", (token, s.append(token), logprobs)))
            for s, n in zip(o.seqs, o.computed):  # (a run cut short by a stop keeps the positions of its tokens)
                self.scheduler.computed(s, min(n, len(s.tokens) - s.computed))
            if self.spec is not None:
                self._drafts(o)
        for s in [s for s in self.scheduler.running if s.finished]:
            self._end(s, s.finish_reason)
        ok = [o for o in outcomes if o.error is None]
        return StepStats(len(batch.decode), len(batch.prefill), sum(n for _, n in batch.prefill),
                         time.perf_counter() - t0, [o.error[0] for o in outcomes if o.error], sum(o.drafted for o in ok),
                         sum(o.accepted for o in ok), outcomes)

    def _drafts(self, o: Outcome) -> None:
        """Each sequence's draft for its next step; the blocks that held only rejected drafts go back."""
        for s in o.seqs:
            if s.finished or s.in_prefill:
                continue
            s.draft = o.drafts.get(s, []) if self.spec.mtp else self.spec.propose(s, self.spec.tokens)
            self.scheduler.trim(s)

    def _failed(self, o: Outcome, now: float) -> None:
        """A micro-batch whose experts failed changed nothing: its sequences run again from where they
        were, unless the failure was a bug ("error") or their own deadline has passed."""
        cause, message = o.error
        for s in o.seqs:
            if cause == "error":
                self._end(s, "error", ("error", ("internal", message)))
            elif s.deadline is not None and now > s.deadline:
                self._end(s, "deadline", ("error", ("deadline", f"deadline passed after {len(s.output)} tokens "
                                                                f"while {message}")))

    def _end(self, s: Sequence, reason: str, event: Event | None = None) -> None:
        s.finish_reason = reason
        self.scheduler.finish(s)
        s.emit(event or ("finish", (reason, s.usage())))

    def fail_running(self, error: BaseException) -> None:
        """A step failed outside any micro-batch (a bug): its running requests end, the engine goes on."""
        for s in list(self.scheduler.running):
            self._end(s, "error", ("error", ("internal", f"step failed: {error!r}")))

    def close(self) -> None:
        self.runner.close()

    # ---- in-process generation --------------------------------------------------------------------

    def stream(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> Iterator[StepOutput]:
        """Yields each new token of every prompt as it is produced."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if self.sized_per_call:
            longest = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, plist))
            self.runner.close()
            self._size(SchedulerConfig(
                max_running=len(prompts), max_seq_len=longest, max_queue=len(prompts),
                max_prompt_tokens=self.args.max_position_embeddings, max_new_tokens=max(sp.max_new_tokens for sp in plist),
                prefill_chunk=max(map(len, prompts)), step_token_budget=sum(map(len, prompts))))
        events: list[tuple[int, Event]] = []
        seqs = [self.add(p, sp, lambda e, i=i: events.append((i, e))) for i, (p, sp) in enumerate(zip(prompts, plist))]
        while self.has_work:
            self.step()
            for i, (kind, payload) in events:
                if kind == "token":
                    token, piece, logprobs = payload
                    yield StepOutput(i, token, piece, seqs[i].finish_reason, logprobs)
                elif kind == "error":
                    raise RuntimeError(f"prompt {i}: {payload[1]}")
            events.clear()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list["Completion"]:
        """Token ids (and text, with a tokenizer) of every prompt's completion."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = [Completion() for _ in prompts]
        for step in self.stream(prompts, plist):
            o = outs[step.index]
            o.output.append(step.token)
            o.text += step.piece
            o.finish_reason = step.finish_reason
        return outs


@dataclass
class Completion:
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
