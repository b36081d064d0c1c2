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
from moe_service.engine.speculative import Speculative, accepted
from moe_service.model.cache import PagedLatentCache, blocks_for
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
    prefill: bool = False  # prompt chunks, else decode rows
    computed: list[int] = field(default_factory=list)  # positions each sequence computed (and kept)
    # each sequence's new tokens, in order (a speculative step gives a sequence several)
    tokens: list[tuple[Sequence, int, Logprobs | None]] = field(default_factory=list)
    drafts: dict[Sequence, list[int]] = field(default_factory=dict)  # the MTP layer's for each one's next step
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # ... and kept
    error: tuple[str, str] | None = None
    stages: dict[str, float] = field(default_factory=dict)
    record: object = None  # the dispatcher's, when remote


class ModelRunner:
    """`dispatchers`, when given, makes the dispatcher of each model thread (the routed experts run
    elsewhere); `micro_batches` decode parts then overlap one another's expert calls, each on its own
    thread with its own dispatcher."""

    def __init__(self, model: Transformer, cache: PagedLatentCache, dispatchers: Callable[[], StepDispatcher] | None = None,
                 micro_batches: int = 1, workload_rows: bool = False, speculative: Speculative | None = None) -> None:
        self.model, self.cache = model, cache
        self.spec = speculative
        self.mtp = speculative is not None and speculative.mtp
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
        out = Outcome(seqs, prefill)
        try:
            if prefill:
                self._prefill(group, d, clock, out)
            else:
                self._decode(seqs, d, clock, out)
        except StepDeadline as e:  # its message says which expert was missing, if one was
            out.error = ("deadline", str(e))
        except Exception as e:  # a bug or a bad answer: this micro-batch's requests fail, the others go on
            out.error = ("error", f"step failed: {e!r}")
        out.stages = clock.totals()
        out.record = d.end() if d is not None else None
        return out

    def _workloads(self, group: list, prefill: bool) -> torch.Tensor | None:
        """Each FFN row's workload class: a decode row per sequence and draft token, a prefill chunk's rows per
        token (a draft layer's calls are counted without classes)."""
        if not self.workload_rows:
            return None
        if prefill:
            return torch.tensor([s.workload for s, n in group for _ in range(n)])
        return torch.tensor([s.workload for s in group for _ in range(1 + len(s.draft))])  # and its draft's

    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """Each row's block table, padded with block 0."""
        width = max(len(s.blocks) for s in seqs)
        return torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=self.device)

    def _decode(self, seqs: list[Sequence], d: StepDispatcher | None, clock: StepClock, out: Outcome) -> None:
        """Each sequence feeds back its last token and its draft (speculative decoding); every position's
        token is drawn from the verification's logits, and the draft is kept up to its first difference."""
        dev = self.device
        drafts = [s.draft for s in seqs]
        n = [1 + len(x) for x in drafts]
        T = max(n)
        ids = torch.tensor([[s.output[-1], *x] + [0] * (T - k) for s, x, k in zip(seqs, drafts, n)], device=dev)
        start = torch.tensor([s.computed for s in seqs], device=dev)
        tables = self._tables(seqs)
        if T == 1 and not self.mtp:  # no draft to verify, none to make: only the last position's logits
            logits = self.model(ids, cache=self.cache, tables=tables, start=start, last_only=True, dispatcher=d,
                                clock=clock)
            out.tokens = self._sample([(s, len(s.output)) for s in seqs], logits, clock)
            out.computed = [1] * len(seqs)
            return
        hidden, _ = self.model.hidden(ids, self.cache, tables, start, torch.tensor(n, device=dev), d, clock)
        rows = [(b, j) for b in range(len(seqs)) for j in range(n[b])]
        b_idx, j_idx = torch.tensor(rows, device=dev).T
        logits = self.model.logits(hidden[b_idx, j_idx])
        drawn = self._sample([(seqs[b], len(seqs[b].output) + j) for b, j in rows], logits, clock)
        kept: list[list[int]] = []
        i = 0
        for s, x, k in zip(seqs, drafts, n):
            row = drawn[i:i + k]
            i += k
            m = accepted(x, [t for _, t, _ in row])
            out.tokens += row[: m + 1]
            out.computed.append(m + 1)
            out.drafted, out.accepted = out.drafted + len(x), out.accepted + m
            kept.append([t for _, t, _ in row[: m + 1]])
        if self.mtp:
            out.drafts = self._draft(seqs, hidden, kept, start, tables, d, clock)

    def _prefill(self, chunks: list[tuple[Sequence, int]], d: StepDispatcher | None, clock: StepClock,
                 out: Outcome) -> None:
        """Prompt chunks (or, after a preemption, the tokens computed again); a prompt's last chunk samples
        its first token. With an MTP draft, its layer runs over the chunk too (its own cache entries), and
        drafts for the sequences whose prefill ends here."""
        T = max(n for _, n in chunks)
        dev = self.device
        ids = torch.tensor([s.tokens[s.computed : s.computed + n] + [0] * (T - n) for s, n in chunks], device=dev)
        start = torch.tensor([s.computed for s, _ in chunks], device=dev)
        num_new = torch.tensor([n for _, n in chunks], device=dev)
        seqs = [s for s, _ in chunks]
        tables = self._tables(seqs)
        out.computed = [n for _, n in chunks]
        hidden, _ = self.model.hidden(ids, self.cache, tables, start, num_new, d, clock)
        last = hidden[torch.arange(len(chunks), device=dev), num_new - 1]
        done = [b for b, (s, n) in enumerate(chunks) if s.computed + n == s.prefill_target and not s.output]
        if done:
            out.tokens = self._sample([(chunks[b][0], 0) for b in done],
                                      self.model.logits(last[torch.tensor(done, device=dev)]), clock)
        if self.mtp:
            first = {s: t for s, t, _ in out.tokens}
            # the token after each position: the prompt's next one, or the one just drawn after its last
            nexts = [s.tokens[s.computed + 1 : s.computed + n + 1] + ([first[s]] if s in first else [])
                     for s, n in chunks]
            drafts = self._draft(seqs, hidden, nexts, start, tables, d, clock)
            out.drafts = {s: drafts[s] for s, n in chunks if s.computed + n == s.prefill_target}

    def _draft(self, seqs: list[Sequence], hidden: torch.Tensor, nexts: list[list[int]], start: torch.Tensor,
               tables: torch.Tensor, d: StepDispatcher | None, clock: StepClock) -> dict[Sequence, list[int]]:
        """The MTP layer over the positions a step kept (row b: `len(nexts[b])` of them from `start[b]`, each
        with the token after it), writing its cache entries there; its last position's logits give the
        first draft token, and each further one feeds its own hidden state back one position on (the
        entries it writes past the kept positions are overwritten by the next step's)."""
        dev = self.device
        n = torch.tensor([len(x) for x in nexts], device=dev)
        T = int(n.max())
        ids = torch.tensor([x + [0] * (T - len(x)) for x in nexts], device=dev)
        t0 = clock.mark()
        ctx = self.model.context(ids, self.cache, tables, start, n)
        ctx.clock = clock
        h, logits = self.model.draft(hidden[:, :T], ids, ctx, dispatcher=d)
        rows = torch.arange(len(seqs), device=dev)
        h, tok = h[rows, n - 1][:, None], logits[rows, n - 1].argmax(-1)
        out = [tok]
        pos = start + n
        if self.spec.tokens > 1:  # room in the tables for the chain: past a row's blocks, the padding block
            width = blocks_for(int(pos.max()) + self.spec.tokens, self.cache.block_size)
            tables = torch.nn.functional.pad(tables, (0, max(0, width - tables.shape[1])))
        for _ in range(self.spec.tokens - 1):
            ctx = self.model.context(tok[:, None], self.cache, tables, pos)
            ctx.clock = clock
            h, logits = self.model.draft(h, tok[:, None], ctx, dispatcher=d)
            tok = logits[:, 0].argmax(-1)
            out.append(tok)
            pos = pos + 1
        clock.add("draft", t0)
        drafts = torch.stack(out, dim=1).tolist()
        return dict(zip(seqs, drafts))

    @staticmethod
    def _sample(rows: list[tuple[Sequence, int]], logits: torch.Tensor, clock: StepClock) -> list:
        """Row i of `logits` is output position rows[i][1] of sequence rows[i][0]."""
        t0 = clock.mark()
        tokens, logprobs = sample(logits, [s.sampler for s, _ in rows], [p for _, p in rows])
        clock.add("sampling", t0)
        return [(s, t, lp) for (s, _), t, lp in zip(rows, tokens, logprobs)]
