"""Speculative decoding served (2 workers): a tiny DeepSeek-V3 with an MoE multi-token-prediction layer (fitted
to the model by the draft trainer: a random one is never right), its draft's experts placed on the workers
like any layer's. Greedy output equals the in-process model without
speculation, alone and in a batch, and stays equal through a live rebalance that moves the draft layer's
experts and through a worker killed mid-stream; the drafted and accepted counters rise in both windows."""

from __future__ import annotations

import threading

import pytest
import ray
import torch

from moe_service import Client, load_model
from moe_service.checkpoint.loader import save_hf_checkpoint
from moe_service.checkpoint.sources import ModuleSource
from moe_service.coder.draft import DraftConfig, fit_draft
from moe_service.engine.engine import Engine
from moe_service.engine.sampling import SamplingParams
from moe_service.serving.local import start_service
from tests.test_soak import counter, kill_and_wait_for_restart

pytestmark = pytest.mark.slow
PRESET = "tiny-v3-mtp"
NEW = 40
DRAFT_LAYER = 3  # tiny-v3-mtp: 3 layers, the MTP layer after them


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The preset with its MTP layer fitted on random token windows (a few seconds), as a checkpoint."""
    model = load_model(PRESET, with_mtp=True)
    fit_draft(model, lambda g: torch.randint(3, 512, (8, 64), generator=g),
              DraftConfig(tokens=8 * 64 * 80, seq_len=64, batch=8, lr=3e-3, warmup_steps=10), log=lambda m: None)
    path = tmp_path_factory.mktemp("speculative") / PRESET
    save_hf_checkpoint(ModuleSource(model), path)
    return path


@pytest.fixture(scope="module")
def workload(checkpoint):
    g = torch.Generator().manual_seed(21)
    prompts = [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 11, 19, 30)]
    engine = Engine(load_model(checkpoint))  # no draft: the output speculation must not change
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    return prompts, [c.output for c in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def service(ray_local, checkpoint):
    svc = start_service(dict(model=str(checkpoint), workers=2, speculative={"method": "mtp", "tokens": 2},
                             gpus_per_worker=0.5, gateway_num_cpus=0, expert_bind_host="127.0.0.1", sd_port=0,
                             rebalance_interval_s=0, rebalance_min_gain=0.0, load_report_interval_s=0.2,
                             scheduler={"max_running": 8, "max_seq_len": 128}))
    yield svc
    svc.shutdown()


def drafted(ctl) -> tuple[float, float]:
    return counter(ctl, "moe_spec_draft_tokens_total"), counter(ctl, "moe_spec_accepted_tokens_total")


def test_served_speculation_gives_the_plain_models_tokens(service, workload):
    prompts, want = workload
    ctl = service.controller()
    routes = ray.get(ctl.table.remote())["routes"]
    assert DRAFT_LAYER in routes, "the draft layer's experts are not placed"
    hosted = {tuple(p) for w in service.worker_pings() for p in w["hosted"]}
    assert {(3, e) for e in range(16)} <= hosted, "a draft layer expert is on no worker"
    d0, a0 = drafted(ctl)
    with Client(service.address) as client:
        assert client.generate_ids(prompts[0], max_new_tokens=NEW, ignore_eos=True) == want[0]  # alone
        outs: dict[int, list[int]] = {}
        threads = [threading.Thread(target=lambda i=i: outs.__setitem__(
            i, Client(service.address).generate_ids(prompts[i], max_new_tokens=NEW, ignore_eos=True)))
            for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [outs[i] for i in range(len(prompts))] == want  # in a batch
    d1, a1 = drafted(ctl)
    assert d1 > d0 and a1 > a0, (d0, d1, a0, a1)


def test_any_draft_over_the_workers_gives_the_plain_models_tokens(service, checkpoint, workload):
    """The gateway's engine over the service's workers (as `bench speculative` runs it, so that any draft can
    be plugged in): the trained draft, one always right and one always wrong give the plain tokens."""
    from moe_service.engine.scheduler import SchedulerConfig
    from moe_service.engine.speculative import Speculative
    from moe_service.serving.gateway.remote import RemoteExperts
    from moe_service.serving.gateway.table import routing_table

    prompts, want = workload
    reference = {tuple(p): o for p, o in zip(prompts, want)}

    def right(seq, k):
        return reference[tuple(seq.prompt)][len(seq.output):len(seq.output) + k]

    def wrong(seq, k):  # never the next token
        return [(t + 1) % 512 for t in right(seq, k)]

    model = load_model(checkpoint, with_routed_experts=False, with_mtp=True)
    remote = RemoteExperts(routing_table(ray.get(service.controller().table.remote())))
    try:
        for name, spec in (("mtp", Speculative(2)), ("right", Speculative(3, right)), ("wrong", Speculative(2, wrong))):
            engine = Engine(model, config=SchedulerConfig(max_running=8, max_seq_len=128),
                            dispatchers=remote.dispatcher, speculative=spec)
            seqs = [engine.add(p, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for p in prompts]
            drafted = accepted = 0
            while engine.has_work:
                st = engine.step()
                drafted, accepted = drafted + st.drafted, accepted + st.accepted
            engine.close()
            assert [s.output for s in seqs] == want, name
            assert drafted > 0, name
            assert (accepted == drafted) if name == "right" else (accepted == 0) if name == "wrong" else accepted > 0
    finally:
        remote.close()


def test_speculation_stays_exact_through_a_rebalance_and_a_worker_kill(service, workload):
    prompts, want = workload
    ctl = service.controller()
    stop = threading.Event()
    results: list[tuple[int, list[int]]] = []
    errors: list[Exception] = []

    def client(i: int) -> None:
        with Client(service.address) as c:
            while not stop.is_set():
                try:
                    results.append((i, c.generate_ids(prompts[i], max_new_tokens=NEW, ignore_eos=True)))
                except Exception as e:  # reported below
                    errors.append(e)
                    return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    try:
        before = ray.get(ctl.table.remote())["routes"][DRAFT_LAYER]["replicas"]
        d0 = drafted(ctl)
        # a third worker: replicas move onto it, the draft layer's among them
        result = ray.get(ctl.rebalance.remote(force=True, num_workers=3), timeout=120)
        assert result["applied"], result
        after = ray.get(ctl.table.remote())["routes"][DRAFT_LAYER]["replicas"]
        assert after != before and any(2 in reps for reps in after), "no draft layer expert moved"
        d1 = drafted(ctl)
        kill_and_wait_for_restart(ctl, 0)
        d2 = drafted(ctl)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert len(results) >= len(prompts)
    assert all(out == want[i] for i, out in results), [i for i, out in results if out != want[i]]
    assert d1[0] > d0[0] and d1[1] > d0[1], (d0, d1)  # speculation ran through the rebalance window
    assert d2[0] > d1[0] and d2[1] > d1[1], (d1, d2)  # and through the kill's
