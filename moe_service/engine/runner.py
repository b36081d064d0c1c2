"""Runs a step's batch through the model: decode rows and prefill chunks, split into micro-batches that
overlap one another's expert calls when the experts are remote, and samples each row's next token.

It reads sequences and never changes them: what a step did comes back as `Outcome`s that the engine
applies on its own thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from moe_service.engine.clock import StepClock, name_os_thread
from moe_service.engine.sampling import Logprobs, sample
from moe_service.engine.scheduler import Batch
from moe_service.engine.sequence import Sequence
from moe_service.model.cache import PagedLatentCache
from moe_service.model.moe import Dispatcher
from moe_service.model.transformer import Transformer


class StepDeadline(Exception):
    """Raised by a dispatcher when its micro-batch's deadline passed before the experts answered."""


class StepDispatcher(Dispatcher, Protocol):
    """A dispatcher one model thread owns: told where each micro-batch begins and ends."""

    def begin(self, deadline: float | None, clock: StepClock, workloads: torch.Tensor | None) -> None:
        """deadline: the latest of the micro-batch's requests' (time.monotonic(); None: one has none);
        workloads [N]: each FFN row's workload class, when the service counts routing per workload."""
        ...

    def end(self) -> object:
        """What it recorded over the micro-batch (routing, per-worker calls), for the step's observers."""
        ...


@dataclass
class Outcome:
    """One micro-batch's result. On failure (`error`: (cause, message), cause "deadline" or "error") nothing
    of it is applied: its sequences stay where they were, to run again or end as the engine decides."""

    seqs: list[Sequence]
    prefilled: list[int] | None = None  # positions each sequence computed (a prefill micro-batch)
    tokens: list[tuple[Sequence, int, Logprobs | None]] = field(default_factory=list)
    error: tuple[str, str] | None = None
    stages: dict[str, float] = field(default_factory=dict)
    record: object = None  # the dispatcher's, when remote


class ModelRunner:
    """`dispatchers`, when given, makes the dispatcher of each model thread (the routed experts run
    elsewhere); `micro_batches` decode parts then overlap one another's expert calls, each on its own
    thread with its own dispatcher."""

    def __init__(self, model: Transformer, cache: PagedLatentCache, dispatchers: Callable[[], StepDispatcher] | None = None,
                 micro_batches: int = 1, workload_rows: bool = False) -> None:
        self.model, self.cache = model, cache
        self.device = model.embed_tokens.weight.device
        self.make_dispatcher = dispatchers
        self.micro_batches = max(1, micro_batches) if dispatchers is not None else 1
        self.workload_rows = workload_rows
        self.dispatchers: list[StepDispatcher] = []
        # the micro-batches after the first (this thread runs the first); prefill counts as one more
        self.pool = ThreadPoolExecutor(max_workers=self.micro_batches, thread_name_prefix="microbatch",
                                       initializer=name_os_thread, initargs=("moe-microbatch",))

    def run(self, batch: Batch) -> list[Outcome]:
        k = min(self.micro_batches, len(batch.decode))
        groups: list[tuple[Sequence, int] | Sequence] = [batch.decode[i::k] for i in range(k)]
        if batch.prefill:
            groups.append(batch.prefill)
        while len(self.dispatchers) < len(groups) and self.make_dispatcher is not None:
            self.dispatchers.append(self.make_dispatcher())
        if len(groups) == 1 or self.make_dispatcher is None:  # nothing to overlap in-process
            return [self._run(i, g) for i, g in enumerate(groups)]
        futures = [self.pool.submit(self._run, i, g) for i, g in enumerate(groups) if i]
        return [self._run(0, groups[0])] + [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown()

    def _run(self, i: int, group: list) -> Outcome:
        prefill = bool(group) and isinstance(group[0], tuple)
        seqs = [s for s, _ in group] if prefill else group
        clock = StepClock(self.device)
        d = self.dispatchers[i] if self.make_dispatcher is not None else None
        if d is not None:
            deadlines = [s.deadline for s in seqs]
            d.begin(None if None in deadlines else max(deadlines), clock, self._workloads(group, prefill))
        out = Outcome(seqs, [n for _, n in group] if prefill else None)
        try:
            out.tokens = self._prefill(group, d, clock) if prefill else self._decode(seqs, d, clock)
        except StepDeadline as e:  # its message says which expert was missing, if one was
            out.error = ("deadline", str(e))
        except Exception as e:  # a bug or a bad answer: this micro-batch's requests fail, the others go on
            out.error = ("error", f"step failed: {e!r}")
        out.stages = clock.totals()
        out.record = d.end() if d is not None else None
        return out

    def _workloads(self, group: list, prefill: bool) -> torch.Tensor | None:
        """Each FFN row's workload class: a decode row per sequence, a prefill chunk's rows per token."""
        if not self.workload_rows:
            return None
        if prefill:
            return torch.tensor([s.workload for s, n in group for _ in range(n)])
        return torch.tensor([s.workload for s in group])

    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """Each row's block table, padded with block 0."""
        width = max(len(s.blocks) for s in seqs)
        return torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=self.device)

    def _decode(self, seqs: list[Sequence], d: StepDispatcher | None, clock: StepClock) -> list:
        dev = self.device
        ids = torch.tensor([[s.output[-1]] for s in seqs], device=dev)
        start = torch.tensor([s.computed for s in seqs], device=dev)
        logits = self.model(ids, cache=self.cache, tables=self._tables(seqs), start=start, last_only=True,
                            dispatcher=d, clock=clock)
        return self._sample(seqs, logits, clock)

    def _prefill(self, chunks: list[tuple[Sequence, int]], d: StepDispatcher | None, clock: StepClock) -> list:
        """Prompt chunks (or, after a preemption, the tokens computed again); a prompt's last chunk samples
        its first token."""
        T = max(n for _, n in chunks)
        dev = self.device
        ids = torch.tensor([s.tokens[s.computed : s.computed + n] + [0] * (T - n) for s, n in chunks], device=dev)
        start = torch.tensor([s.computed for s, _ in chunks], device=dev)
        num_new = torch.tensor([n for _, n in chunks], device=dev)
        seqs = [s for s, _ in chunks]
        logits = self.model(ids, cache=self.cache, tables=self._tables(seqs), start=start, num_new=num_new,
                            last_only=True, dispatcher=d, clock=clock)
        done = [b for b, (s, n) in enumerate(chunks) if s.computed + n == s.prefill_target and not s.output]
        if not done:
            return []
        return self._sample([chunks[b][0] for b in done], logits[torch.tensor(done, device=dev)], clock)

    @staticmethod
    def _sample(seqs: list[Sequence], logits: torch.Tensor, clock: StepClock) -> list:
        t0 = clock.mark()
        tokens, logprobs = sample(logits, [s.sampler for s in seqs])
        clock.add("sampling", t0)
        return list(zip(seqs, tokens, logprobs))
