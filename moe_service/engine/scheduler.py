"""Iteration-level (continuous) batching over the compressed KV cache. Plain Python and torch.

Every step decodes all running sequences together, prefills waiting prompts in chunks within a
token budget (so running streams keep flowing), and admits waiting requests whose KV reservation
fits. Requests leave when finished, cancelled, or past their deadline, freeing slot and tokens.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from moe_service.engine.engine import Sequence, check_tokens
from moe_service.model.cache import LatentCache
from moe_service.model.moe import ExpertBackend
from moe_service.model.transformer import Transformer
from moe_service.engine.sampling import SamplingParams, sample
from moe_service.engine.tokenizer import Tokenizer


class Rejected(Exception):
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
    micro_batches: int = 2  # split a step's decode batch so attention overlaps expert calls

    @property
    def capacity(self) -> int:
        return self.kv_capacity_tokens or self.max_running * self.max_seq_len

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_tokens or self.max_seq_len - 1


Event = tuple[str, object]  # ("token", (id, piece, logprobs | None)) | ("finish", (reason, usage)) | ("error", (kind, message))


@dataclass
class Request(Sequence):
    """A Sequence with a slot in the cache, a KV reservation, and a way to tell its client."""

    id: int = 0
    emit: Callable[[Event], None] = lambda e: None
    deadline: float | None = None  # time.monotonic() value
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    reserved: int = 0
    cancelled: bool = False
    workload: int = 0  # the client's workload class (x-moe-workload), as an index the gateway defines

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.prompt)

    def usage(self) -> dict[str, float]:
        now = time.monotonic()
        return {
            "prompt_tokens": len(self.prompt), "generated_tokens": len(self.output),
            "time_to_first_token_s": (self.t_first - self.t_start) if self.t_first else 0.0,
            "total_time_s": now - self.t_start,
        }


class StepDeadline(Exception):
    """Raised by an expert backend when its micro-batch's deadline passed before the experts answered."""


@dataclass
class StepStats:
    decode_rows: int = 0
    prefill_rows: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the cause of each micro-batch that failed


# a micro-batch's deadline, and the workload index of each of its FFN rows (None: no workload accounting)
# -> the experts it uses
StepBackend = Callable[[float | None, "torch.Tensor | None"], ExpertBackend]


class Scheduler:
    """Owns the KV cache and the running set. `step()` is called by one thread (EngineLoop);
    `submit`/`cancel` may be called from any thread.

    `backend`, when given, runs the routed experts elsewhere; it is asked for one per micro-batch,
    with the latest deadline of the micro-batch's requests. A micro-batch whose experts fail
    (StepDeadline, or any error) is not applied: its requests are where they were, and each whose
    own deadline has passed ends with "deadline"; any other error ends them with "internal"."""

    def __init__(self, model: Transformer, config: SchedulerConfig, tokenizer: Tokenizer | None = None,
                 backend: StepBackend | None = None, hook: Callable[[str, float], None] | None = None,
                 workload_rows: bool = False) -> None:
        self.model, self.config, self.tokenizer, self.backend = model, config, tokenizer, backend
        self.hook = hook  # (stage, seconds) timings for metrics
        self.workload_rows = workload_rows  # tell the backend each FFN row's workload (routing metrics)
        self.args = model.args
        if config.max_seq_len > self.args.max_position_embeddings:
            config.max_seq_len = self.args.max_position_embeddings
        w = model.embed_tokens.weight
        self.device = w.device  # the model's: a step's inputs are made there, once per step
        self.cache = LatentCache(self.args, config.max_running, config.max_seq_len, dtype=w.dtype, device=w.device)
        self.lock = threading.Lock()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_slots = list(range(config.max_running))[::-1]
        self.reserved_tokens = 0
        self.ids = itertools.count(1)
        self.pool = ThreadPoolExecutor(max_workers=max(1, config.micro_batches), thread_name_prefix="microbatch")
        self.last_step = StepStats()

    # ---- admission (any thread) -------------------------------------------------------------

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        c, V = self.config, self.args.vocab_size
        try:
            check_tokens(prompt, V, c.prompt_limit)
        except ValueError as e:
            raise Rejected("invalid", str(e), "prompt_too_long" if len(prompt) > c.prompt_limit else "invalid") from None
        try:
            params.validate(V, c.max_new_tokens)
        except ValueError as e:
            raise Rejected("invalid", str(e)) from None
        need = len(prompt) + params.max_new_tokens
        if need > c.max_seq_len:
            raise Rejected("invalid", f"prompt ({len(prompt)}) plus max_new_tokens ({params.max_new_tokens}) is {need} "
                                      f"tokens; a sequence may hold at most {c.max_seq_len}", "prompt_too_long")
        if need > c.capacity:
            raise Rejected("exhausted", f"request needs {need} KV cache tokens; the cache holds {c.capacity}",
                           "kv_capacity")

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None],
               timeout_s: float | None = None, workload: int = 0) -> Request:
        self.validate(prompt, params)
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        req = Request(prompt, params, self.args.eos_token_id, detok, id=next(self.ids), emit=emit,
                      deadline=time.monotonic() + timeout_s if timeout_s else None, workload=workload)
        with self.lock:
            if len(self.waiting) >= self.config.max_queue:
                raise Rejected("exhausted", f"the waiting queue is full ({self.config.max_queue} requests waiting, "
                                            f"{self.config.max_running} running: scheduler.max_queue and "
                                            "scheduler.max_running)", "queue_full")
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True  # acted on at the next step

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "kv_reserved_tokens": self.reserved_tokens, "kv_capacity_tokens": self.config.capacity,
                    "kv_used_tokens": sum(r.prefilled + max(0, len(r.output) - 1) for r in self.running)}

    # ---- one iteration (the engine thread) ----------------------------------------------------

    def _release(self, req: Request) -> None:
        if req.slot >= 0:
            self.free_slots.append(req.slot)
            req.slot = -1
        self.reserved_tokens -= req.reserved
        req.reserved = 0

    def _finish(self, req: Request, reason: str, event: Event | None = None) -> None:
        req.finish_reason = reason
        self._release(req)
        req.emit(event or ("finish", (reason, req.usage())))

    def _admit(self) -> None:
        now = time.monotonic()
        with self.lock:
            for req in list(self.waiting):
                if req.cancelled or (req.deadline is not None and now > req.deadline):
                    self.waiting.remove(req)
                    kind = "cancelled" if req.cancelled else "deadline"
                    self._finish(req, kind, ("error", (kind, "request cancelled" if req.cancelled
                                                       else "deadline passed while the request was waiting")))
            while self.waiting and self.free_slots:
                req = self.waiting[0]
                need = len(req.prompt) + req.params.max_new_tokens
                if self.reserved_tokens + need > self.config.capacity:
                    break  # FIFO: the head waits for room, nobody overtakes it
                self.waiting.popleft()
                req.slot, req.reserved = self.free_slots.pop(), need
                self.reserved_tokens += need
                self.running.append(req)

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for req in list(self.running):
            if req.cancelled or (req.deadline is not None and now > req.deadline):
                self.running.remove(req)
                kind = "cancelled" if req.cancelled else "deadline"
                self._finish(req, kind, ("error", (kind, "request cancelled" if req.cancelled
                                                   else f"deadline passed after {len(req.output)} tokens")))

    def step(self) -> StepStats:
        t0 = time.perf_counter()
        self._drop_dead()
        self._admit()
        decode = [r for r in self.running if not r.in_prefill]
        # the budget protects running streams; with none decoding, prefill goes a whole chunk at a time
        budget = self.config.step_token_budget if decode else max(self.config.step_token_budget, self.config.prefill_chunk)
        prefill = []
        for r in self.running:
            if r.in_prefill and budget > 0:
                n = min(self.config.prefill_chunk, len(r.prompt) - r.prefilled, budget)
                prefill.append((r, n))
                budget -= n
        groups: list[tuple[list[Request], Callable[[], None]]] = []
        k = max(1, min(self.config.micro_batches, len(decode)))
        for i in range(k):
            part = decode[i::k]
            if part:
                groups.append((part, lambda part=part: self._decode(part)))
        if prefill:
            groups.append(([r for r, _ in prefill], lambda: self._prefill(prefill)))
        if len(groups) > 1 and self.backend is not None:
            # micro-batches in flight together: one's attention runs while another waits on experts;
            # this thread computes the first, the pool's threads the others
            futures = [self.pool.submit(self._run_group, reqs, g) for reqs, g in groups[1:]]
            results = [self._run_group(*groups[0])] + [f.result() for f in futures]
        else:
            results = [self._run_group(reqs, g) for reqs, g in groups]
        causes = []
        for cause, ended in results:
            causes.append(cause)
            for r, kind, event in ended:
                self.running.remove(r)
                self._finish(r, kind, event)
        for r in list(self.running):
            if r.finished:
                self.running.remove(r)
                self._finish(r, r.finish_reason)
        self.last_step = StepStats(len(decode), len(prefill), sum(n for _, n in prefill), time.perf_counter() - t0,
                                   [c for c in causes if c])
        return self.last_step

    def _run_group(self, reqs: list[Request], run: Callable[[], None]
                   ) -> tuple[str | None, list[tuple[Request, str, Event]]]:
        """Runs one micro-batch. On failure: the cause ("deadline" or "error"), and the requests that
        end with it (the rest run again in the next step, from where they were)."""
        try:
            run()
            return None, []
        except StepDeadline:
            cause, message = "deadline", "the experts were unavailable"
        except Exception as e:  # a bug or a bad answer: these requests fail, the others go on
            cause, message = "error", f"step failed: {e!r}"
        now = time.monotonic()
        ended = []
        for r in reqs:
            if cause == "error":
                ended.append((r, "error", ("error", ("internal", message))))
            elif r.deadline is not None and now > r.deadline:
                ended.append((r, "deadline", ("error", ("deadline", f"deadline passed after {len(r.output)} "
                                                                   f"tokens while {message}"))))
        return cause, ended

    def _emit_tokens(self, reqs: list[Request], logits: torch.Tensor) -> None:
        t0 = time.perf_counter()
        tokens, logprobs = sample(logits, [r.sampler for r in reqs])
        if self.hook is not None:
            self.hook("sampling", time.perf_counter() - t0)
        for r, tok, lp in zip(reqs, tokens, logprobs):
            piece = r.append(tok)
            r.emit(("token", (tok, piece, lp)))

    def _backend(self, reqs: list[Request], rows: list[int] | None = None) -> ExpertBackend | None:
        """`rows`: FFN rows per request (its prefill chunk), one each when None (decode)."""
        if self.backend is None:
            return None
        deadlines = [r.deadline for r in reqs]
        workloads = None
        if self.workload_rows:
            w = torch.tensor([r.workload for r in reqs])
            workloads = w if rows is None else w.repeat_interleave(torch.tensor(rows))
        return self.backend(None if None in deadlines else max(deadlines), workloads)

    def _decode(self, reqs: list[Request]) -> None:
        dev = self.device
        ids = torch.tensor([[r.output[-1]] for r in reqs], device=dev)
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        start = torch.tensor([r.length - 1 for r in reqs], device=dev)
        logits = self.model(ids, cache=self.cache, slots=slots, start=start, last_only=True,
                            backend=self._backend(reqs), hook=self.hook)
        self._emit_tokens(reqs, logits)

    def _prefill(self, chunks: list[tuple[Request, int]]) -> None:
        T = max(n for _, n in chunks)
        dev = self.device
        ids = torch.tensor([r.prompt[r.prefilled : r.prefilled + n] + [0] * (T - n) for r, n in chunks], device=dev)
        slots = torch.tensor([r.slot for r, _ in chunks], device=dev)
        start = torch.tensor([r.prefilled for r, _ in chunks], device=dev)
        num_new = torch.tensor([n for _, n in chunks], device=dev)
        logits = self.model(ids, cache=self.cache, slots=slots, start=start, num_new=num_new, last_only=True,
                            backend=self._backend([r for r, _ in chunks], [n for _, n in chunks]), hook=self.hook)
        done = []
        for b, (r, n) in enumerate(chunks):
            r.prefilled += n
            if not r.in_prefill:
                done.append(b)
        if done:
            self._emit_tokens([chunks[b][0] for b in done], logits[torch.tensor(done, device=self.device)])


class EngineLoop:
    """Runs `scheduler.step()` on its own thread while there is work; sleeps on a condition otherwise.
    Other jobs (Forward requests, table switches) run on the same thread between steps."""

    def __init__(self, scheduler: Scheduler, after_step: Callable[[StepStats], None] | None = None) -> None:
        self.scheduler, self.after_step = scheduler, after_step
        self.cv = threading.Condition()
        self.jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None],
               timeout_s: float | None = None, workload: int = 0) -> Request:
        req = self.scheduler.submit(prompt, params, emit, timeout_s, workload)
        self.wake()
        return req

    def cancel(self, req: Request) -> None:
        self.scheduler.cancel(req)
        self.wake()

    def run_job(self, fn: Callable[[], object]) -> Future:
        fut: Future = Future()
        with self.cv:
            self.jobs.append((fn, fut))
            self.cv.notify()
        return fut

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(10)

    def _run(self) -> None:
        sched = self.scheduler
        while True:
            with self.cv:
                while not self.stopping and not self.jobs and not sched.has_work:
                    self.cv.wait()
                if self.stopping:
                    return
                jobs = list(self.jobs)
                self.jobs.clear()
            for fn, fut in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller
                        fut.set_exception(e)
            if sched.has_work:
                try:
                    stats = sched.step()
                except Exception as e:  # a bug outside any micro-batch: fail the running requests, keep serving
                    self._fail_running(e)
                    stats = StepStats(failures=["error"])
                if self.after_step is not None:
                    self.after_step(stats)

    def _fail_running(self, error: Exception) -> None:
        sched = self.scheduler
        for r in list(sched.running):
            sched.running.remove(r)
            sched._finish(r, "error", ("error", ("internal", f"step failed: {error!r}")))
