"""Speculative decoding in the engine: with any draft (the model's MTP layer, one always right, one always
wrong) the output is the output without speculation, greedy and seeded-sampled, alone and in a batch, and
through stops, max_new_tokens, preemption and prefix reuse; a right draft takes several tokens a step."""

from __future__ import annotations

import time

import pytest
import torch

from moe_service import load_model
from moe_service.engine.engine import Engine
from moe_service.engine.sampling import SamplingParams
from moe_service.engine.scheduler import SchedulerConfig
from moe_service.engine.speculative import Speculative

PRESET = "tiny-v3-mtp"
NEW = 24


@pytest.fixture(scope="module")
def model():
    return load_model(PRESET, with_mtp=True)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 33, 2)]


def run(model, prompts, params, speculative=None, config=None):
    engine = Engine(model, config=config, speculative=speculative)
    steps = {"drafted": 0, "accepted": 0, "steps": 0}
    if config is None:
        outs = [c.output for c in engine.generate(prompts, params)]
        return outs, steps
    seqs = [engine.add(p, params) for p in prompts]
    while engine.has_work:
        st = engine.step()
        steps["drafted"] += st.drafted
        steps["accepted"] += st.accepted
        steps["steps"] += 1
    return [s.output for s in seqs], steps


def replay(reference: dict[tuple, list[int]]):
    """A draft that is always right: the plain run's continuation of this prompt."""
    def propose(seq, k):
        want = reference[tuple(seq.prompt)]
        return want[len(seq.output):len(seq.output) + k]
    return propose


def wrong(vocab: int):
    def propose(seq, k):  # never the next token
        return [(seq.output[-1] + 1 + i) % vocab for i in range(k)]
    return propose


CONFIG = dict(max_running=8, max_seq_len=128)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_any_draft_gives_the_output_without_speculation(model, prompts, temperature):
    params = SamplingParams(max_new_tokens=NEW, temperature=temperature, seed=5, ignore_eos=True)
    plain, _ = run(model, prompts, params, config=SchedulerConfig(**CONFIG))
    reference = {tuple(p): o for p, o in zip(prompts, plain)}
    drafts = {"mtp": Speculative(2), "right": Speculative(3, replay(reference)),
              "wrong": Speculative(2, wrong(model.args.vocab_size))}
    for name, spec in drafts.items():
        got, steps = run(model, prompts, params, spec, SchedulerConfig(**CONFIG))
        assert got == plain, name
        assert steps["drafted"] > 0, name
        if name == "right":
            assert steps["accepted"] == steps["drafted"]
        if name == "wrong":
            assert steps["accepted"] == 0
    # alone equals in a batch
    for p, want in zip(prompts, plain):
        got, _ = run(model, [p], params, Speculative(2), SchedulerConfig(**CONFIG))
        assert got == [want]


def test_a_right_draft_takes_several_tokens_a_step_and_stops_inside_a_run(model, prompts):
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    plain, base = run(model, prompts[:1], params, config=SchedulerConfig(**CONFIG))
    reference = {tuple(prompts[0]): plain[0]}
    got, steps = run(model, prompts[:1], params, Speculative(3, replay(reference)), SchedulerConfig(**CONFIG))
    assert got == plain
    # 1 prefill step, then 4 tokens a step
    assert steps["steps"] <= 1 + -(-(NEW - 1) // 4) < base["steps"]
    # a stop token inside an accepted run ends the sequence there
    stop = plain[0][9]
    first = plain[0].index(stop)
    stopped = SamplingParams(max_new_tokens=NEW, stop_token_ids=(stop,), ignore_eos=True)
    got, _ = run(model, prompts[:1], stopped, Speculative(3, replay(reference)), SchedulerConfig(**CONFIG))
    assert got == [plain[0][:first + 1]]
    # max_new_tokens is never passed
    short = SamplingParams(max_new_tokens=6, ignore_eos=True)
    got, _ = run(model, prompts[:1], short, Speculative(3, replay(reference)), SchedulerConfig(**CONFIG))
    assert got == [plain[0][:6]]


def test_logprobs_come_from_the_verification_logits(model, prompts):
    """Every token of an accepted run reports the log-probabilities a plain step gives it."""
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=3)

    def streamed(spec):
        engine = Engine(model, config=SchedulerConfig(**CONFIG), speculative=spec)
        return [(o.index, o.token, o.logprobs) for o in engine.stream(prompts[:2], [params] * 2)]

    plain = streamed(None)
    reference = {}
    for i, token, _ in plain:
        reference.setdefault(tuple(prompts[i]), []).append(token)
    spec = streamed(Speculative(3, replay(reference)))
    assert sorted((i, t) for i, t, _ in spec) == sorted((i, t) for i, t, _ in plain)
    by_position = {}
    for i, token, lp in plain:
        by_position.setdefault(i, []).append(lp)
    for i, token, lp in spec:
        want = by_position[i].pop(0)
        assert abs(lp[0] - want[0]) <= 1e-4 and [t for t, _ in lp[1]] == [t for t, _ in want[1]]
        assert max(abs(a - b) for (_, a), (_, b) in zip(lp[1], want[1])) <= 1e-4


def test_samples_of_one_prompt_cancellation_and_deadlines(model, prompts):
    """n samples of one prompt (seeds s, s + 1, ...: what the gateway makes of `n`) give the plain run's
    tokens while a sequence beside them is cancelled mid-run and another passes its deadline; those two
    end with a prefix of their plain output."""
    samples = [SamplingParams(max_new_tokens=NEW, temperature=0.7, seed=5 + i, ignore_eos=True) for i in range(3)]
    greedy = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    plain_samples = [c.output for c in Engine(model).generate([prompts[1]] * 3, samples)]
    plain_others = [c.output for c in Engine(model).generate(prompts[2:4], greedy)]
    assert len({tuple(o) for o in plain_samples}) == 3
    engine = Engine(model, config=SchedulerConfig(**CONFIG), speculative=Speculative(2))
    seqs = [engine.add(prompts[1], q) for q in samples]
    cancelled, late = (engine.add(p, greedy) for p in prompts[2:4])
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
        if steps == 4:
            engine.cancel(cancelled)
            late.deadline = time.monotonic()  # passes before the next step
    assert [s.output for s in seqs] == plain_samples
    assert cancelled.finish_reason == "cancelled" and late.finish_reason == "deadline"
    for seq, want in ((cancelled, plain_others[0]), (late, plain_others[1])):
        assert 0 < len(seq.output) < NEW and seq.output == want[:len(seq.output)]


def test_preemption_and_prefix_reuse_change_nothing(model, prompts):
    """A cache too small for every sequence at once (preemptions), prompts sharing a prefix (reuse)."""
    shared = prompts[2][:33]
    many = [shared + [7 + i] for i in range(4)] + prompts[:2]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    small = dict(max_running=6, max_seq_len=96, kv_capacity_tokens=160)
    plain, _ = run(model, many, params, config=SchedulerConfig(**small))
    engine = Engine(model, config=SchedulerConfig(**small), speculative=Speculative(2))
    seqs = [engine.add(p, params) for p in many]
    while engine.has_work:
        engine.step()
    assert [s.output for s in seqs] == plain
    assert engine.stats()["preemptions"] > 0 and engine.stats()["prefix_hit_tokens"] > 0


def test_above_max_batch_no_draft_is_verified(model, prompts):
    """The batch rule: with 4 sequences decoding and max_batch 2, no step verifies a draft until only 2 are
    left; the output is the plain run's."""
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    plain, _ = run(model, prompts, params, config=SchedulerConfig(**CONFIG))
    reference = {tuple(p): o for p, o in zip(prompts, plain)}
    uneven = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (NEW, NEW, 4, 6)]
    engine = Engine(model, config=SchedulerConfig(**CONFIG), speculative=Speculative(2, replay(reference), max_batch=2))
    seqs = [engine.add(p, q) for p, q in zip(prompts, uneven)]
    per_step = []
    while engine.has_work:
        st = engine.step()
        per_step.append((st.decode_rows, st.drafted))
    assert [s.output for s in seqs] == [o[:q.max_new_tokens] for o, q in zip(plain, uneven)]
    assert all(drafted == 0 for rows, drafted in per_step if rows > 2)
    assert any(drafted > 0 for rows, drafted in per_step if rows <= 2)


def test_speculative_settings_are_checked():
    args = load_model("tiny").args
    with pytest.raises(ValueError, match="speculative .method mtp. needs a model with a multi-token-prediction layer"):
        Speculative.from_setting({"method": "mtp", "tokens": 1}, args)
    mtp_args = load_model(PRESET).args
    with pytest.raises(ValueError, match=r"speculative.tokens must be in \[1, 8\]"):
        Speculative.from_setting({"method": "mtp", "tokens": 9}, mtp_args)
    with pytest.raises(ValueError, match="speculative.method must be 'mtp'"):
        Speculative.from_setting({"method": "eagle"}, mtp_args)
    assert Speculative.from_setting({"method": "mtp", "tokens": 2}, mtp_args) == Speculative(2)
    assert Speculative.from_setting({"tokens": 2, "max_batch": 4}, mtp_args) == Speculative(2, max_batch=4)
    with pytest.raises(ValueError, match="speculative.max_batch must be a positive integer"):
        Speculative.from_setting({"tokens": 2, "max_batch": 0}, mtp_args)
    with pytest.raises(ValueError, match="speculative has unknown keys"):
        Speculative.from_setting({"tokens": 2, "draft": "x"}, mtp_args)
    with pytest.raises(ValueError, match="with_mtp=True"):
        Engine(load_model(PRESET), speculative=Speculative(1))
