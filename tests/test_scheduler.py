"""The engine's continuous batching without Ray: chunked prefill, the paged KV cache (admission by
blocks, preemption, prefix reuse), bounded queue, cancellation, and per-request sampling that does not
depend on the batch."""

from __future__ import annotations

import pytest
import torch

from moe_service import load_model
from moe_service.engine.engine import Engine
from moe_service.engine.sampling import SamplingParams
from moe_service.engine.scheduler import Rejected, SchedulerConfig


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


def prompt(n: int, seed: int = 0) -> list[int]:
    return [1] + torch.randint(3, 512, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.events: list[tuple] = []

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if ev[0] == "token":
            self.tokens.append(ev[1][0])

    @property
    def done(self) -> bool:
        return any(e[0] in ("finish", "error") for e in self.events)


def run_all(s: Engine, max_steps: int = 10_000) -> int:
    steps = 0
    while s.has_work and steps < max_steps:
        s.step()
        steps += 1
    return steps


def test_outputs_equal_the_reference_engine(model):
    cfg = SchedulerConfig(max_running=3, max_seq_len=512, prefill_chunk=32, step_token_budget=48)
    s = Engine(model, config=cfg)
    lengths = (3, 70, 9, 200, 17)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    cols = [Collector() for _ in lengths]
    for i, (n, c) in enumerate(zip(lengths, cols)):
        s.add(prompt(n, i), params, c)
    run_all(s)
    eng = Engine(model)
    for i, (n, c) in enumerate(zip(lengths, cols)):
        assert c.tokens == eng.generate([prompt(n, i)], params)[0].output
        assert c.events[-1][0] == "finish" and c.events[-1][1][0] == "length"
    st = s.stats()
    assert (st["running"], st["waiting"], st["kv_used_tokens"], st["kv_blocks_used"]) == (0, 0, 0, 0)
    assert st["kv_capacity_tokens"] == 3 * 512 and st["kv_blocks_free"] + st["kv_blocks_kept"] == st["kv_blocks_total"]


def test_long_prompt_is_chunked_while_streams_keep_flowing(model):
    cfg = SchedulerConfig(max_running=4, max_seq_len=1024, prefill_chunk=64, step_token_budget=64)
    s = Engine(model, config=cfg)
    short = Collector()
    s.add(prompt(5), SamplingParams(max_new_tokens=50, ignore_eos=True), short)
    s.step()
    assert len(short.tokens) == 1
    long = Collector()
    s.add(prompt(400, 1), SamplingParams(max_new_tokens=4, ignore_eos=True), long)
    for i in range(6):  # 400 prompt tokens at 64 per step: six steps of prefill
        before = len(short.tokens)
        stats = s.step()
        assert stats.prefill_tokens <= 64
        assert len(short.tokens) == before + 1, "a running stream stalled during a long prefill"
        assert not long.tokens
    s.step()
    assert len(long.tokens) == 1  # prefill done (400 = 6*64 + 16), first token sampled


def test_request_that_can_never_fit_the_cache_is_invalid(model):
    s = Engine(model, config=SchedulerConfig(max_running=4, max_seq_len=256, kv_capacity_tokens=96))
    with pytest.raises(Rejected) as err:
        s.add(prompt(60), SamplingParams(max_new_tokens=50), Collector())
    assert err.value.kind == "invalid" and err.value.cause == "kv_capacity"
    assert "is 110 tokens; the KV cache holds at most 96 (scheduler.kv_capacity_tokens)" in str(err.value)


def test_small_pool_preempts_and_every_request_ends_with_the_unconstrained_tokens(model):
    """Six blocks of 16 for four sequences of 60 tokens (4 blocks each): they are admitted as their prompts
    fit, grow a block at a time, and the newest is preempted when the pool runs out; each ends with the
    greedy tokens of a run with room for all, and the pool ends with no block in use."""
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompts = [prompt(30, 40 + i) for i in range(4)]
    small = Engine(model, config=SchedulerConfig(max_running=4, max_seq_len=128, kv_capacity_tokens=96))
    cols = [Collector() for _ in prompts]
    for p, c in zip(prompts, cols):
        small.add(p, params, c)
    running = []
    while small.has_work:
        small.step()
        running.append(small.stats()["running"])
    st = small.stats()
    assert st["preemptions"] > 0 and max(running) >= 2
    want = Engine(model).generate(prompts, params)
    assert [c.tokens for c in cols] == [w.output for w in want]
    assert all(c.events[-1][0] == "finish" for c in cols)
    assert st["kv_blocks_used"] == 0 and st["kv_used_tokens"] == 0


def test_blocks_not_reservations_bound_concurrency(model):
    """Memory for two sequences of max_seq_len holds eight short ones at once: admission counts the blocks
    a prompt needs now, not prompt + max_new_tokens up front."""
    s = Engine(model, config=SchedulerConfig(max_running=16, max_seq_len=256, kv_capacity_tokens=2 * 256))
    cols = [Collector() for _ in range(8)]
    for i, c in enumerate(cols):
        s.add(prompt(20, 60 + i), SamplingParams(max_new_tokens=20, ignore_eos=True), c)
    s.step()
    assert s.stats()["running"] == 8
    run_all(s)
    assert all(len(c.tokens) == 20 for c in cols) and s.stats()["preemptions"] == 0


def test_shared_prefix_is_computed_once_and_changes_no_output(model):
    """A second request starting with the first one's 64 prompt tokens computes only its own suffix, from
    blocks the first left behind; its tokens equal those of an engine with prefix caching off. Kept blocks
    are not used KV: the cache is idle."""
    system = prompt(64, 7)
    first, second = system + prompt(9, 8)[1:], system + prompt(21, 9)[1:]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    outs = {}
    for caching in (True, False):
        s = Engine(model, config=SchedulerConfig(max_running=4, max_seq_len=256, prefix_caching=caching))
        a, b = Collector(), Collector()
        s.add(first, params, a)
        run_all(s)
        s.add(second, params, b)
        s.step()
        st = s.stats()
        assert st["prefix_hit_tokens"] == (64 if caching else 0) and st["prefix_query_tokens"] == len(first) + len(second)
        run_all(s)
        usage = b.events[-1][1][1]
        assert usage["cached_tokens"] == (64 if caching else 0) and usage["prompt_tokens"] == len(second)
        outs[caching] = (a.tokens, b.tokens)
        st = s.stats()
        assert st["kv_blocks_used"] == 0 and st["kv_used_tokens"] == 0 and (st["kv_blocks_kept"] > 0) == caching
    assert outs[True] == outs[False]


def test_full_queue_rejects_at_once(model):
    s = Engine(model, config=SchedulerConfig(max_running=1, max_seq_len=64, max_queue=2))
    p = SamplingParams(max_new_tokens=4)
    s.add(prompt(4), p, Collector())
    s.add(prompt(4), p, Collector())
    with pytest.raises(Rejected) as err:
        s.add(prompt(4), p, Collector())
    assert err.value.kind == "exhausted" and "queue is full (2 requests waiting" in str(err.value)


@pytest.mark.parametrize("bad,words", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(stop_token_ids=(10**7,)), "stop_token_ids"),
])
def test_bad_sampling_parameters_are_invalid(model, bad, words):
    s = Engine(model, config=SchedulerConfig(max_running=1, max_seq_len=64))
    with pytest.raises(Rejected) as err:
        s.add(prompt(4), SamplingParams(**bad), Collector())
    assert err.value.kind == "invalid" and words in str(err.value)


def test_cancel_and_deadline_free_slot_and_cache(model):
    s = Engine(model, config=SchedulerConfig(max_running=2, max_seq_len=128))
    p = SamplingParams(max_new_tokens=100, ignore_eos=True)
    a, b = Collector(), Collector()
    ra = s.add(prompt(8), p, a)
    s.add(prompt(8, 1), p, b, timeout_s=1e-9)  # its deadline has passed by the next step
    s.step()
    assert b.events and b.events[-1][0] == "error" and b.events[-1][1][0] == "deadline"
    assert s.stats()["running"] == 1
    s.cancel(ra)
    s.step()
    assert a.events[-1] == ("error", ("cancelled", "request cancelled"))
    assert s.stats()["running"] == 0 and s.stats()["kv_blocks_used"] == 0


def test_seeded_request_is_the_same_alone_and_in_a_batch(model):
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = Collector()
    s = Engine(model, config=SchedulerConfig(max_running=8, max_seq_len=256))
    s.add(prompt(10), params, alone)
    run_all(s)
    s = Engine(model, config=SchedulerConfig(max_running=8, max_seq_len=256, prefill_chunk=16, step_token_budget=32))
    others = [Collector() for _ in range(5)]
    for i, c in enumerate(others[:3]):
        s.add(prompt(5 + 7 * i, 10 + i), SamplingParams(max_new_tokens=15, temperature=1.0, seed=i), c)
    mixed = Collector()
    s.add(prompt(10), params, mixed)
    for i, c in enumerate(others[3:]):
        s.add(prompt(30, 20 + i), SamplingParams(max_new_tokens=25, temperature=0.7), c)
    run_all(s)
    assert mixed.tokens == alone.tokens and len(alone.tokens) == 20
