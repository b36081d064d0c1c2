"""The engine's continuous batching without Ray: chunked prefill, KV accounting, bounded queue,
cancellation, and per-request sampling that does not depend on the batch."""

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
    assert s.stats() == {"running": 0, "waiting": 0, "kv_reserved_tokens": 0, "kv_capacity_tokens": 3 * 512,
                         "kv_used_tokens": 0}
    assert sorted(s.scheduler.free_slots) == [0, 1, 2]


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


def test_kv_capacity_makes_requests_wait_and_rejects_what_never_fits(model):
    cfg = SchedulerConfig(max_running=4, max_seq_len=256, kv_capacity_tokens=100)
    s = Engine(model, config=cfg)
    with pytest.raises(Rejected) as err:
        s.add(prompt(60), SamplingParams(max_new_tokens=50), Collector())
    assert err.value.kind == "exhausted" and "needs 110 KV cache tokens; the cache holds 100" in str(err.value)
    a, b = Collector(), Collector()
    s.add(prompt(30), SamplingParams(max_new_tokens=30, ignore_eos=True), a)  # reserves 60
    s.add(prompt(30, 1), SamplingParams(max_new_tokens=30, ignore_eos=True), b)  # 60 more: must wait
    s.step()
    assert s.stats()["running"] == 1 and s.stats()["waiting"] == 1 and s.stats()["kv_reserved_tokens"] == 60
    while not a.done:
        s.step()
        if not a.done:
            assert not b.tokens
    run_all(s)
    assert len(b.tokens) == 30 and s.stats()["kv_reserved_tokens"] == 0


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
    assert s.stats()["running"] == 0 and s.stats()["kv_reserved_tokens"] == 0 and len(s.scheduler.free_slots) == 2


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
