"""The gateway's routed experts over real expert servers on loopback (no Ray): the same output as
in-process through any layout, each model thread on its own dispatcher's streams, and the failover policy
(a lost worker's pairs go to other replicas, or wait for a new table, and only the step's deadline fails
a step)."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import torch

from moe_service import load_model
from moe_service.routing import LayerRoutes
from moe_service.engine.engine import Engine
from moe_service.engine.sampling import SamplingParams
from moe_service.engine.runner import StepDeadline
from moe_service.engine.scheduler import SchedulerConfig
from moe_service.serving.gateway.remote import RemoteExperts, RoutingTable
from moe_service.transport import fastwire
from moe_service.serving.worker.servicer import ExpertServicer
from tests.aio import LoopThread
from tests.test_transport import layer_inputs, split_experts, start_workers

PRESET = "tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(PRESET)


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


def table_of(replicas, servers, version: int = 1) -> RoutingTable:
    return RoutingTable(version, {l: LayerRoutes(l, r) for l, r in replicas.items()},
                        {w: s.address for w, s in servers.items()})


def call(remote: RemoteExperts, layer, x, w, e, deadline=None):
    """One layer call on a dispatcher of its own: (the answer, the worker calls it made)."""
    d = remote.dispatcher()
    return d.run(layer, x, w, e, deadline), d.record.calls


@pytest.mark.parametrize("num_workers,replicate", [(1, None), (2, None), (3, {0: [1, 2], 5: [0]}), (4, {3: [0, 1, 2]})])
def test_remote_moe_layer_equals_in_process(loop, model, num_workers, replicate):
    hosts, replicas = split_experts(model, num_workers, replicate)
    servers = loop.run(start_workers(hosts))
    remote = RemoteExperts(table_of(replicas, servers))
    d = remote.dispatcher()
    try:
        # 37 tokens: every message small; 1200: large ones (tensors viewed, outputs written in place)
        for layer, T in itertools.product(model.args.moe_layers, (37, 1200)):
            _, x, w, e = layer_inputs(model, T, seed=layer)
            want = model.layers[layer].mlp.experts(x, w, e)
            got = d.run(layer, x, w, e)
            calls, stages = d.record.calls, d.clock.totals()
            assert (got - want).abs().max().item() <= 1e-5
            assert sorted(stages) == ["combine", "dispatch", "experts", "wire"]
            assert 0 <= stages["wire"] <= stages["experts"]  # the wire's share of the experts stage, never more
            assert all(c.ok and c.compute_seconds > 0 for c in calls) and len(calls) == len(servers)
            largest = max(c.bytes_received for c in calls)
            assert (largest >= fastwire.SMALL_MESSAGE) == (T > 37), largest
        assert remote.open_addresses() == {s.address for s in servers.values()}  # one stream per worker
    finally:
        remote.close()
        for s in servers.values():
            loop.run(s.stop(0))


def test_a_device_gateways_copies_run_on_this_machine_too(loop, model):
    """A GPU gateway's wire path, staged through host buffers here: per layer call two copies to the
    host (the routing, the hidden rows) and one back (the combined answer), and the same output."""
    hosts, replicas = split_experts(model, 2, {0: [1]})
    servers = loop.run(start_workers(hosts))
    remote = RemoteExperts(table_of(replicas, servers), stage_always=True)
    d = remote.dispatcher()
    try:
        layer, x, w, e = layer_inputs(model, 9)
        for _ in range(3):  # buffers reused call after call
            got = d.run(layer, x, w, e)
            assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        assert d.staging.copies == {"to_host": 6, "to_device": 3}
    finally:
        remote.close()
        for s in servers.values():
            loop.run(s.stop(0))


@pytest.mark.parametrize("T", [4, 40])  # 24 pairs: the small planner; 240: the tensor planner
def test_a_layer_call_plans_from_the_staged_tensors_not_the_callers(loop, model, monkeypatch, T):
    """A GPU gateway's tensors live where the host-side plan cannot read them. The meta device stands in
    for it here: its tensors have no data at all, so a plan (or a retry) made from the caller's tensors
    instead of the staged host copies fails."""
    from moe_service.transport.staging import HostStaging

    E = model.args.n_routed_experts
    hosts, replicas = split_experts(model, 3, {e: [(e + 1) % 3] for e in range(E)})
    servers = loop.run(start_workers(hosts))
    layer, x, w, e = layer_inputs(model, T, seed=T)
    answers = []

    def to_host(self, x_, w_, e_):
        assert x_.is_meta and w_.is_meta and e_.is_meta
        return x.clone(), w.clone(), e.clone()

    def to_device(self, y, device):
        assert device.type == "meta"
        answers.append(y.clone())
        return y.to(device)

    monkeypatch.setattr(HostStaging, "to_host", to_host)
    monkeypatch.setattr(HostStaging, "to_device", to_device)
    remote = RemoteExperts(table_of(replicas, servers))
    try:
        loop.run(servers[2].stop(0))  # and a retry: the lost worker's pairs are planned again
        got, _ = call(remote, layer, x.to("meta"), w.to("meta"), e.to("meta"))
        assert got.is_meta and len(answers) == 1
        assert (answers[0] - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
    finally:
        remote.close()
        for s in servers.values():
            loop.run(s.stop(0))


def test_a_worker_started_empty_serves_the_dtype_it_is_then_given(loop, model):
    """The controller's recovery path starts a worker with no experts and loads them afterwards: it then
    computes in the loaded experts' dtype (bfloat16 here), not the float32 it would have guessed empty."""
    from moe_service.checkpoint import load_experts
    from moe_service.serving.worker.servicer import HostedLayer
    from moe_service.transport.server import start_expert_server

    args = model.args
    servicer = ExpertServicer({}, worker_id="late", hidden_size=args.hidden_size, num_experts=args.n_routed_experts)
    server = loop.run(start_expert_server(servicer))
    layer = args.moe_layers[0]
    pairs = [(layer, e) for e in range(args.n_routed_experts)]
    (module, ids), = load_experts(PRESET, pairs, torch.bfloat16).values()
    servicer.set_hosted({layer: HostedLayer.build(module, ids, args.n_routed_experts)})
    remote = RemoteExperts(RoutingTable(1, {layer: LayerRoutes(layer, [[0]] * args.n_routed_experts)},
                                        {0: server.address}))
    try:
        for T in (3, 40):  # computed inline, and on the compute thread
            _, x, w, e = layer_inputs(model, T)
            x = x.bfloat16()
            got, _ = call(remote, layer, x, w, e)
            assert got.dtype == torch.bfloat16 and torch.equal(got, module(x, w, e))
    finally:
        remote.close()
        loop.run(server.stop(0))


@pytest.mark.parametrize("T", [1, 40])
def test_a_layer_call_turns_no_ids_or_rows_into_python_lists(loop, model, monkeypatch, T):
    """Ids and rows cross the wire in one form each (the plan's tensors' bytes, read back with one
    frombuffer): no Tensor.tolist anywhere in a layer call, gateway or worker side (the servers run in
    this process), replicas split by share, and a lost worker's pairs planned again."""
    E = model.args.n_routed_experts
    hosts, replicas = split_experts(model, 3, {e: [(e + 1) % 3] for e in range(E)})
    servers = loop.run(start_workers(hosts))
    remote = RemoteExperts(table_of(replicas, servers))
    d = remote.dispatcher()
    layer, x, w, e = layer_inputs(model, T, seed=T)
    want = model.layers[layer].mlp.experts(x, w, e)

    def no_lists(self):
        raise AssertionError("a layer call turned a tensor into a Python list")

    try:
        d.run(layer, x, w, e)  # streams opened, routing tables built: once, not per call
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "tolist", no_lists)
            got = d.run(layer, x, w, e)
            loop.run(servers[2].stop(0))
            retried = d.run(layer, x, w, e)
        assert (got - want).abs().max().item() <= 1e-5 and (retried - want).abs().max().item() <= 1e-5
        assert any(c.retried for c in d.record.calls)
    finally:
        remote.close()
        for s in (servers[0], servers[1]):
            loop.run(s.stop(0))


def test_each_thread_uses_its_own_streams(loop, model):
    """Two threads call at once (two micro-batches), each with its own dispatcher: each writes and reads on
    its own streams, and both get exact answers."""
    import threading

    hosts, replicas = split_experts(model, 2)
    servers = loop.run(start_workers(hosts))
    remote = RemoteExperts(table_of(replicas, servers))
    results, mine = {}, {}
    try:
        def run(i: int) -> None:
            layer, x, w, e = layer_inputs(model, 5 + i, seed=i)
            d = remote.dispatcher()
            for _ in range(20):
                results[i] = (d.run(layer, x, w, e) - model.layers[layer].mlp.experts(x, w, e)).abs().max()
            mine[i] = d.streams

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(v.item() <= 1e-5 for v in results.values()) and len(results) == 2
        assert mine[0] is not mine[1] and mine[0].loop is not mine[1].loop
        assert remote.open_addresses() == {servers[0].address, servers[1].address}
        # a new table without worker 1 (between steps): every dispatcher's stream to it closes
        remote.switch(RoutingTable(2, remote.table.routes, {0: servers[0].address}))
        assert remote.open_addresses() == {servers[0].address}
    finally:
        remote.close()
        for s in servers.values():
            loop.run(s.stop(0))


@pytest.mark.parametrize("T", [4, 40])
def test_lost_worker_with_replicas_retries_only_its_pairs(loop, model, T):
    E = model.args.n_routed_experts
    # every expert on its home worker e % 3 and on one more, so any one worker can be lost
    hosts, replicas = split_experts(model, 3, {e: [(e + 1) % 3] for e in range(E)})
    servers = loop.run(start_workers(hosts))
    remote = RemoteExperts(table_of(replicas, servers))
    try:
        layer, x, w, e = layer_inputs(model, T, seed=T)
        loop.run(servers[2].stop(0))
        got, calls = call(remote, layer, x, w, e)
        assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        failed = [c for c in calls if not c.ok]
        assert [c.worker for c in failed] == [2]
        retried = [c for c in calls if c.retried]
        assert retried and all(c.ok and c.worker != 2 for c in retried)
        # the retry carries exactly the rows that had a pair on the lost worker: no padding-only row
        assert sum(c.rows for c in retried) >= failed[0].rows
        assert max(c.rows for c in retried) <= failed[0].rows
    finally:
        remote.close()
        for w in (0, 1):
            loop.run(servers[w].stop(0))


@pytest.mark.parametrize("T", [4, 40])
def test_lost_only_replica_waits_for_a_new_table_and_keeps_the_steps_own(loop, model, T):
    """One replica per expert: the lost worker's pairs wait for a newer table (a restarted worker at
    a new address), which serves this call only; the gateway's table switches between steps."""
    hosts, replicas = split_experts(model, 2)
    servers = loop.run(start_workers(hosts))
    restarted = loop.run(start_workers({1: hosts[1]}))[1]
    asked: list[tuple[set, int]] = []
    newer = RoutingTable(2, {l: LayerRoutes(l, r) for l, r in replicas.items()},
                         {0: servers[0].address, 1: restarted.address})

    def wait_for_table(excluded: set[int], version: int, wait_s: float):
        asked.append((set(excluded), version))
        return newer

    first = table_of(replicas, servers)
    remote = RemoteExperts(first, wait_for_table=wait_for_table)
    try:
        layer, x, w, e = layer_inputs(model, T, seed=T)
        loop.run(servers[1].stop(0))
        got, calls = call(remote, layer, x, w, e)
        assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        assert asked == [({1}, 1)]
        assert remote.table is first, "a call's new table replaced the gateway's mid-step"
        assert any(c.ok and c.retried and c.worker == 1 for c in calls)
    finally:
        remote.close()
        loop.run(servers[0].stop(0))
        loop.run(restarted.stop(0))


def test_a_lost_worker_is_known_to_every_model_thread_at_once(loop, model):
    """The first thread to find a worker gone marks it down for the gateway: another thread's next call
    plans without it (no call of its own to find out), until the next table says where workers are."""
    E = model.args.n_routed_experts
    hosts, replicas = split_experts(model, 2, {e: [0, 1] for e in range(E)})
    servers = loop.run(start_workers(hosts))
    remote = RemoteExperts(table_of(replicas, servers))
    try:
        layer, x, w, e = layer_inputs(model, 40)
        loop.run(servers[1].stop(0))
        _, calls = call(remote, layer, x, w, e)  # one model thread finds it
        assert any(not c.ok and c.worker == 1 for c in calls) and remote.down == {1}
        got, calls = call(remote, layer, x, w, e)  # another's dispatcher
        assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        assert calls and all(c.ok and c.worker == 0 and not c.retried for c in calls)
        remote.switch(table_of(replicas, servers, version=2))
        assert not remote.down
    finally:
        remote.close()
        loop.run(servers[0].stop(0))


def test_a_worker_that_no_longer_hosts_an_expert_is_a_lost_worker(loop, model):
    """A rebalance dropped the replica a call was sent to (FAILED_PRECONDITION, a stale table): its
    pairs go to the other replica instead of failing the step."""
    E = model.args.n_routed_experts
    hosts, replicas = split_experts(model, 2, {e: [0, 1] for e in range(E)})
    servers = loop.run(start_workers(hosts))
    remote = RemoteExperts(table_of(replicas, servers))
    try:
        layer, x, w, e = layer_inputs(model, 40)
        servers[1].servicer.set_hosted({})  # worker 1 dropped every replica
        got, calls = call(remote, layer, x, w, e)
        assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        assert any(not c.ok and c.worker == 1 for c in calls) and all(c.worker == 0 for c in calls if c.retried)
    finally:
        remote.close()
        for s in servers.values():
            loop.run(s.stop(0))


class HungServicer(ExpertServicer):
    async def _answer(self, request, deadline):
        await asyncio.sleep(30)


def test_a_hung_worker_costs_one_call_timeout_and_the_deadline_ends_the_step(loop, model):
    E = model.args.n_routed_experts
    hosts, replicas = split_experts(model, 2, {e: [0, 1] for e in range(E)})
    servers = loop.run(start_workers(hosts))
    hung = loop.run(start_workers({1: hosts[1]}, servicer_class=HungServicer))[1]
    hung_too = loop.run(start_workers({0: hosts[0]}, servicer_class=HungServicer))[0]
    table = RoutingTable(1, {l: LayerRoutes(l, r) for l, r in replicas.items()},
                         {0: servers[0].address, 1: hung.address})
    remote = RemoteExperts(table, call_timeout_s=0.3)
    # every replica hung
    stuck = RemoteExperts(RoutingTable(1, table.routes, {0: hung_too.address, 1: hung.address}), call_timeout_s=0.3)
    # the call timeout far away: a message's own deadline (its base + per row) finds the hung worker
    by_rows = RemoteExperts(table, call_timeout_s=30.0, message_timeout_s=0.2, row_timeout_s=0.01)
    try:
        layer, x, w, e = layer_inputs(model, 8)
        got, _ = call(remote, layer, x, w, e, deadline=time.monotonic() + 20)
        assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        t0 = time.monotonic()
        got, calls = call(by_rows, layer, x, w, e, deadline=t0 + 20)
        assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        assert time.monotonic() - t0 < 3.0 and any(not c.ok and c.worker == 1 for c in calls)
        # with every replica hung, the step fails when its deadline passes, and only then
        t0 = time.monotonic()
        with pytest.raises(StepDeadline, match=r"no live replica of expert \d+ in layer \d+: every worker hosting it"):
            call(stuck, layer, x, w, e, deadline=t0 + 1.0)
        assert 0.9 <= time.monotonic() - t0 < 3.0
    finally:
        remote.close()
        stuck.close()
        by_rows.close()
        for s in (*servers.values(), hung, hung_too):
            loop.run(s.stop(0))


class KillingServicer(ExpertServicer):
    """Worker 0: at its 20th request, stops worker 2's server on this loop, while other calls are in flight."""

    requests = 0
    victim = None

    async def _answer(self, request, deadline):
        KillingServicer.requests += 1
        if KillingServicer.requests == 20:
            asyncio.ensure_future(KillingServicer.victim.stop(0))
        return await super()._answer(request, deadline)


def test_worker_lost_in_a_step_mixing_prefill_and_decode_changes_no_token(loop, model):
    """The engine runs decode and prefill micro-batches in one step; a worker goes away during one of
    them. Every stream equals the in-process engine's, and no request fails."""
    E = model.args.n_routed_experts
    hosts, replicas = split_experts(model, 3, {e: [(e + 1) % 3] for e in range(E)})
    servers = {**loop.run(start_workers({0: hosts[0]}, servicer_class=KillingServicer)),
               **loop.run(start_workers({1: hosts[1], 2: hosts[2]}))}
    KillingServicer.requests, KillingServicer.victim = 0, servers[2]
    remote = RemoteExperts(table_of(replicas, servers))
    engine = Engine(model, config=SchedulerConfig(max_running=8, max_seq_len=128, prefill_chunk=8, step_token_budget=8,
                                                  micro_batches=2), dispatchers=remote.dispatcher)
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 30, 5, 21)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    events: dict[int, list] = {i: [] for i in range(len(prompts))}
    mixed, retried = [], 0
    try:
        for i, p in enumerate(prompts):
            engine.add(p, params, events[i].append, timeout_s=60)
        while engine.has_work:
            stats = engine.step()
            mixed.append(stats.decode_rows > 0 and stats.prefill_rows > 0)
            retried += sum(c.retried for o in stats.outcomes for c in o.record.calls)
            assert not stats.failures, [e for ev in events.values() for e in ev if e[0] == "error"]
        reference = Engine(model)
        for i, p in enumerate(prompts):
            tokens = [ev[1][0] for ev in events[i] if ev[0] == "token"]
            assert events[i][-1][0] == "finish", events[i][-1]
            assert tokens == reference.generate([p], params)[0].output, i
        assert KillingServicer.requests > 20 and retried and any(mixed)
    finally:
        engine.close()
        remote.close()
        for w in (0, 1):
            loop.run(servers[w].stop(0))


class SlowServicer(ExpertServicer):
    """Answers after a fixed delay and records when each request was in flight on the worker."""

    delay_s = 0.05
    intervals: list[tuple[float, float]] = []

    async def _answer(self, request, deadline):
        t0 = time.monotonic()
        await asyncio.sleep(self.delay_s)
        out = await super()._answer(request, deadline)
        self.intervals.append((t0, time.monotonic()))
        return out


def test_ping_pong_keeps_one_micro_batch_on_the_wire_while_the_other_computes(loop, model):
    """Two decode micro-batches per step, a deliberately slow worker: the worker holds both
    micro-batches' calls at once (one's expert call is in flight while the other runs attention),
    so a step costs about one delay per MoE layer, not two, and the tokens equal the in-process ones."""
    hosts, replicas = split_experts(model, 1)
    slow = loop.run(start_workers(hosts, servicer_class=SlowServicer))[0]
    SlowServicer.intervals = []
    remote = RemoteExperts(table_of(replicas, {0: slow}))
    sched = Engine(model, config=SchedulerConfig(max_running=4, max_seq_len=64, micro_batches=2),
                   dispatchers=remote.dispatcher)
    g = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(3, 512, (4,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    events: dict[int, list] = {i: [] for i in range(len(prompts))}
    try:
        for i, p in enumerate(prompts):
            sched.add(p, params, events[i].append, timeout_s=60)
        decode_steps = []
        while sched.has_work:
            stats = sched.step()
            if stats.decode_rows == len(prompts):
                decode_steps.append(stats.seconds)
        layers = len(model.args.moe_layers)
        # serialised, a 4-row decode step in two micro-batches would take 2 x layers x delay
        assert max(decode_steps) < 1.5 * layers * SlowServicer.delay_s, decode_steps
        iv = sorted(SlowServicer.intervals)
        overlapping = sum(b[0] < a[1] for a, b in zip(iv, iv[1:]))
        assert overlapping >= len(decode_steps) * layers, "the two micro-batches' calls were never in flight together"
        engine = Engine(model)
        for i, p in enumerate(prompts):
            assert [ev[1][0] for ev in events[i] if ev[0] == "token"] == engine.generate([p], params)[0].output
    finally:
        sched.close()
        remote.close()
        loop.run(slow.stop(0))


def test_standbys_parked_in_host_memory_join_their_layer_on_first_use(loop, model):
    """`standby: host`: a worker keeps its standbys out of the layer's module; calls that need none leave
    them parked, the first that reaches one joins the layer's standbys to the module (timed), and every
    answer equals the in-process layer's."""
    from moe_service.serving.worker.actor import ExpertWorker

    E, K, layers = model.args.n_routed_experts, model.args.num_experts_per_tok, model.args.moe_layers
    pairs = [(l, e) for l in layers for e in range(E)]
    parked = [(l, e) for l in layers for e in range(E // 2, E)]
    worker = ExpertWorker(0, PRESET, "float32", bind_host="127.0.0.1", standby="host")
    loop.run(worker.start(pairs, parked))
    routes = {l: LayerRoutes(l, [[0]] * E) for l in layers}
    remote = RemoteExperts(RoutingTable(1, routes, {0: worker.addresses["address"]}))
    promotions = lambda: worker.metrics.registry.get_sample_value(  # noqa: E731
        "moe_standby_promotion_seconds_count", {"worker": "0"})
    try:
        layer = layers[0]
        h = worker.hosted[layer]
        assert h.experts.num_local == E // 2 and h.parked_ids == list(range(E // 2, E))
        g = torch.Generator().manual_seed(3)
        x = torch.randn(24, model.args.hidden_size, generator=g)
        e = torch.stack([torch.randperm(E // 2, generator=g)[:K] for _ in range(24)])  # serving experts only
        w = torch.rand(24, K, generator=g)
        got, _ = call(remote, layer, x, w, e)
        assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        assert h.parked is not None and not promotions()
        _, x, w, e = layer_inputs(model, 64)  # every expert, standbys included
        assert int(e.max()) >= E // 2
        got, _ = call(remote, layer, x, w, e)
        assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        assert h.parked is None and h.experts.num_local == E and promotions() == 1
        assert worker.hosted[layers[1]].parked is not None  # the other layer's stay parked
        # a load that makes every replica serve brings the standbys to the device; one that parks them again
        # takes them out of the module
        loop.run(worker.load(pairs, []))
        assert all(worker.hosted[l].parked is None and worker.hosted[l].experts.num_local == E for l in layers)
        loop.run(worker.load(pairs, parked))
        assert all(worker.hosted[l].experts.num_local == E // 2 for l in layers)
        got, _ = call(remote, layer, x, w, e)
        assert (got - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
    finally:
        remote.close()
        loop.run(worker.stop())
