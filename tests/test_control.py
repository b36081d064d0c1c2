"""The control plane's protocol without Ray: the controller with a fake launcher and fake gateways.
A gateway never finds a replica gone that the table it routes with names; rebalances survive gateways
that never confirm, workers that die while loading, each other, and autoscaling; a restarted controller
takes over the running workers without reloading any, above every version a gateway holds."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from moe_service.serving.control.pool import Found, Started, WorkerLost
from moe_service.serving.control.window import LoadWindow
from moe_service.serving.control.controller import Controller
from moe_service.cli.views import format_rebalance
from tests.support import eventually_async

CONFIG = dict(model="tiny", workers=3, expert_bind_host="127.0.0.1", sd_port=0, rebalance_interval_s=0,
              health_interval_s=0.05, confirm_timeout_s=0.5, gateway_recent_s=5.0, rebalance_min_gain=0.0)


REPLICA_BYTES = 3 * 64 * 32 * 4  # one tiny expert in float32


class FakeWorker:
    def __init__(self, worker_id: int, generation: int, pairs, standbys=()) -> None:
        self.worker_id, self.generation, self.pairs = worker_id, generation, set(map(tuple, pairs))
        self.standbys = set(map(tuple, standbys))
        self.alive, self.loads = True, 0
        self.address = f"fake-{worker_id}-g{generation}-{id(self)}:1"  # a new process, a new address


class FakeLauncher:
    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        self.die_on_next_load = False  # the next worker asked to load dies while loading
        self.died: list[int] = []
        self.load_delay_s = 0.0
        self.memory: dict | None = None  # each memory pool's size and free bytes before any expert (None: not said)
        self.pool_of = lambda worker: "node"  # which pool a worker's experts draw from

    async def start(self, worker_id: int, generation: int, pairs, standbys=()) -> Started:
        w = FakeWorker(worker_id, generation, pairs, standbys)
        self.workers.append(w)
        return Started(w, w.address, f"fake-metrics-{worker_id}:1")

    async def load(self, handle: FakeWorker, pairs, standbys=()) -> None:
        await asyncio.sleep(self.load_delay_s)  # a load takes a while
        if self.die_on_next_load:
            self.die_on_next_load = False
            handle.alive = False
            self.died.append(handle.worker_id)
        if not handle.alive:
            raise WorkerLost("died while loading")
        handle.pairs, handle.loads = set(map(tuple, pairs)), handle.loads + 1
        handle.standbys = set(map(tuple, standbys))

    async def ping(self, handle: FakeWorker) -> dict | None:
        if not handle.alive:
            raise WorkerLost("gone")
        if self.memory is None:
            return None
        held = len(handle.pairs) * REPLICA_BYTES
        pool = self.pool_of(handle)
        taken = sum(len(w.pairs) for w in self.workers if w.alive and self.pool_of(w) == pool) * REPLICA_BYTES
        return {"hosted": sorted(handle.pairs), "expert_bytes": held,
                "memory": {**self.memory, "pool": pool, "free_bytes": self.memory["free_bytes"] - taken, "held_bytes": held}}

    async def stop(self, handle: FakeWorker) -> None:
        handle.alive = False

    async def running(self) -> list[Found]:
        return [Found(w, w.address, "m:1", w.worker_id, w.generation, sorted(w.pairs), sorted(w.standbys))
                for w in self.workers if w.alive]

    async def stop_all(self) -> None:
        for w in self.workers:
            w.alive = False

    def hosting(self, address: str) -> set:
        w = next(w for w in self.workers if w.address == address)
        return w.pairs if w.alive else set()


class FakeGateway:
    """Follows the table like the real gateway: long-polls, switches, confirms. Every table it routes with
    is checked against what the workers host, whenever it is in use."""

    def __init__(self, name: str, ctl: Controller, launcher: FakeLauncher, confirms: bool = True) -> None:
        self.name, self.ctl, self.launcher, self.confirms = name, ctl, launcher, confirms
        self.table: dict | None = None
        self.violations: list = []
        self.task: asyncio.Task | None = None
        self.reported = False  # its first report reached the controller

    async def run(self) -> None:
        self.table = await self.ctl.table()
        await self.ctl.report_load(self.name, self._zeros(), self.table["version"], None)
        self.reported = True
        while True:
            t = await self.ctl.wait_for_table(self.table["version"], 0.2)
            if t["version"] > self.table["version"]:
                self.table = t
                if self.confirms:
                    await self.ctl.report_load(self.name, self._zeros(), t["version"], None)
            self.check()

    def check(self) -> None:
        """Every replica the table routes to is hosted by its worker (or the worker is down and excluded)."""
        for layer, r in self.table["routes"].items():
            for e, reps in enumerate(r["replicas"]):
                for w in reps:
                    address = self.table["addresses"].get(w)
                    if address is not None and self.launcher.hosting(address) and (layer, e) not in self.launcher.hosting(address):
                        self.violations.append((self.table["version"], layer, e, w))

    def _zeros(self) -> list:
        return np.zeros((len(self.ctl.moe_layers), self.ctl.args.n_routed_experts)).tolist()


def hot_load(ctl: Controller) -> None:
    """Routed load where experts 0 and 1 of every layer are hot, as a gateway would report it."""
    load = np.ones((len(ctl.moe_layers), ctl.args.n_routed_experts))
    load[:, :2] = 50
    ctl.window = ctl.window.add(time.monotonic(), load)


def hosted_as_placed(ctl: Controller, launcher: FakeLauncher) -> None:
    for w, worker in ctl.pool.workers.items():
        assert worker.healthy
        assert launcher.hosting(worker.address) == set(ctl.pairs_of(ctl.placement, w)), w


async def service(gateways: int = 1, confirms: bool = True, **overrides):
    launcher = FakeLauncher()
    ctl = Controller({**CONFIG, **overrides}, launcher, recovering=False)
    await ctl.start()
    gws = [FakeGateway(f"gw{i}", ctl, launcher, confirms) for i in range(gateways)]
    for g in gws:
        g.task = asyncio.get_running_loop().create_task(g.run())
    await eventually_async(lambda: all(g.reported for g in gws), what="the gateways' first reports")
    return launcher, ctl, gws


async def stop(ctl: Controller, gws: list[FakeGateway]) -> None:
    for g in gws:
        g.task.cancel()
    await asyncio.gather(*(g.task for g in gws), return_exceptions=True)
    await ctl.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_rebalance_moves_replicas_without_a_gateway_losing_one():
    async def go():
        launcher, ctl, gws = await service(gateways=2)
        hot_load(ctl)
        before = ctl.placement
        r = await ctl.rebalance(force=True)
        assert r["applied"] and r["gateways_switched"] and ctl.placement.moves_from(before) > 0
        hosted_as_placed(ctl, launcher)
        await eventually_async(lambda: all(g.table["version"] == ctl.version for g in gws),
                               what="every gateway on the new table")
        assert all(not g.violations for g in gws)
        await stop(ctl, gws)
    run(go())


def test_the_time_objective_plans_by_predicted_time_and_applies_only_a_predicted_gain():
    """rebalance_objective "time": the plan minimises the cost model's slowest worker for layer calls of
    rebalance_batch tokens; its gain is the predicted drop of the expert stage, and a re-plan of what it
    just applied predicts none, so the controller leaves it be, as it does when the window empties."""
    async def go():
        # tiny's experts cost an H200 nothing but the call: time it as a simulated cluster of V2-Lite experts
        launcher, ctl, gws = await service(rebalance_objective="time", rebalance_batch=4096, rebalance_min_gain=0.05,
                                           simulate={"device": "H200", "shape": "DeepSeek-V2-Lite"})
        hot_load(ctl)
        r = await ctl.rebalance()
        assert r["objective"] == "time" and r["applied"]
        assert r["predicted_expert_stage_s_after"] < r["predicted_expert_stage_s_before"] / 1.05
        assert r["gain"] == pytest.approx(r["predicted_expert_stage_s_before"] / r["predicted_expert_stage_s_after"] - 1)
        assert "predicted expert stage per layer (objective: time)" in format_rebalance(r)
        hosted_as_placed(ctl, launcher)
        again = await ctl.rebalance()
        assert not again["applied"] and again["gain"] <= 1e-9
        ctl.window = LoadWindow(ctl.cfg.load_window_s)  # traffic stopped: an empty window moves nothing
        idle = await ctl.rebalance()
        assert not idle["applied"] and idle["gain"] == 0.0
        await stop(ctl, gws)
    run(go())


def test_objective_settings_are_checked():
    from moe_service.serving.config import ServiceConfig

    with pytest.raises(ValueError, match="'tokens' or 'time'"):
        ServiceConfig.from_dict({"rebalance_objective": "speed"})
    with pytest.raises(ValueError, match="needs cost_device"):
        ServiceConfig.from_dict({"rebalance_objective": "time"})
    with pytest.raises(ValueError, match="unknown device"):
        ServiceConfig.from_dict({"rebalance_objective": "time", "cost_device": "TPU"})


def test_a_gateway_that_never_confirms_delays_the_drop_by_the_bound_only():
    async def timed_rebalance(confirms: bool) -> tuple[dict, float]:
        launcher, ctl, gws = await service(confirms=confirms)
        hot_load(ctl)
        t0 = time.monotonic()
        r = await ctl.rebalance(force=True)
        seconds = time.monotonic() - t0
        hosted_as_placed(ctl, launcher)
        await stop(ctl, gws)
        return r, seconds

    async def go():
        # the same rebalance with a gateway that confirms, timed in this run: what it costs without the wait
        confirmed, normal = await timed_rebalance(confirms=True)
        assert confirmed["applied"] and confirmed["gateways_switched"]
        r, waited = await timed_rebalance(confirms=False)
        assert r["applied"] and not r["gateways_switched"]
        bound = CONFIG["confirm_timeout_s"]  # then old replicas go anyway
        assert bound <= waited <= 2 * normal + 1.5 * bound, (waited, normal, bound)
    run(go())


def test_min_replicas_holds_from_start_through_rebalances_scaling_and_a_loss():
    """min_replicas 2: every expert on two workers at start, after a rebalance and a scale step; a lost
    worker shows as under-replicated experts until its restart restores them."""
    async def go():
        launcher, ctl, gws = await service(gateways=2, min_replicas=2)
        assert ctl.placement.replica_counts().min() >= 2
        info = ctl._worker_info()  # what `moe-service stats` shows: the standbys' memory per worker
        assert all(w["standbys"] > 0 and w["standby_bytes"] == w["standbys"] * REPLICA_BYTES for w in info)
        for num_workers in (None, 4, 3):  # a rebalance, a worker added, one removed
            hot_load(ctl)
            r = await ctl.rebalance(force=True, num_workers=num_workers)
            assert r["applied"] and ctl.placement.replica_counts().min() >= 2, num_workers
            hosted_as_placed(ctl, launcher)
        under = lambda: ctl.metrics.under_replicated._value.get()  # noqa: E731
        assert under() == 0
        lost = ctl.pool.workers[1]
        lost.handle.alive = False
        restored = lambda: ctl.metrics.redundancy_restored._sum.get()  # noqa: E731
        await eventually_async(lambda: lost.restarts == 1 and lost.healthy and under() == 0 and restored() > 0,
                               what="the worker restarted and redundancy restored (seen below, then back)")
        assert all(not g.violations for g in gws)
        await stop(ctl, gws)
    run(go())


@pytest.mark.parametrize("pools,share,want", [("one", 0.79, 2), ("one", 0.81, 1), ("each", 0.79, 2),
                                               ("each", 0.81, 1), (None, 0.0, 1)])
def test_unset_min_replicas_is_2_where_the_workers_memory_holds_the_standbys(pools, share, want):
    """Decided at start on what the (empty) workers report, against the experts with standbys they would hold;
    workers sharing a pool (one node's RAM) add up; a restarted controller decides the same on the loaded ones."""
    async def go():
        launcher = FakeLauncher()
        probe = Controller(CONFIG, launcher, recovering=False)
        need = probe.slots_for(3, 2) * len(probe.moe_layers) * REPLICA_BYTES  # per worker, with standbys
        if pools is not None:
            launcher.memory = {"free_bytes": int((3 if pools == "one" else 1) * need / share), "total_bytes": 1 << 40}
        ctl = Controller(CONFIG, launcher, recovering=False)
        if pools == "each":  # every worker its own device
            launcher.pool_of = lambda worker: f"gpu-{worker.worker_id}"
        await ctl.start()
        assert ctl.min_replicas == want and ctl.redundancy.startswith(f"auto: {want}"), ctl.redundancy
        assert ctl.placement.replica_counts().min() == want
        assert ctl.replicas_per_worker == ctl.slots_for(3, want)
        again = Controller(CONFIG, launcher, recovering=True)
        await again.table()  # recovers
        assert again.min_replicas == want, again.redundancy
        await again.shutdown()
    run(go())


def test_standbys_in_host_memory_are_told_to_the_workers_through_plans_and_a_restart():
    """`standby: host`: each worker is told which of its replicas are standbys, at start, through a rebalance
    (where, while both tables may be in use, a replica is a standby only if it is one in both), and a
    restarted controller reads them back (they keep no share) without reloading anything."""
    def told(ctl, launcher) -> None:
        for w in ctl.pool.workers:
            worker = next(x for x in launcher.workers if x.alive and x.worker_id == w)
            assert worker.standbys == set(ctl.standbys_of(ctl.placement, w)), w

    async def go():
        launcher, ctl, gws = await service(min_replicas=2, standby="host")
        assert any(ctl.standbys_of(ctl.placement, w) for w in ctl.pool.workers)
        told(ctl, launcher)
        seen, published = [], [0]  # what each worker was told during the rebalance, before the new table or after
        load, publish = launcher.load, ctl._publish_new

        async def watched(handle, pairs, standbys=()):
            seen.append((published[0], handle.worker_id, set(map(tuple, pairs)), set(map(tuple, standbys))))
            await load(handle, pairs, standbys)

        async def counted(placement):
            published[0] += 1
            return await publish(placement)
        launcher.load, ctl._publish_new = watched, counted
        old = ctl.placement
        hot_load(ctl)
        assert (await ctl.rebalance(force=True))["applied"]
        told(ctl, launcher)
        new = ctl.placement
        assert [s for s in seen if s[0] == 0], "nothing loaded before the new table"
        for phase, w, pairs, standbys in seen:
            serving = set(ctl.pairs_of(new, w)) - set(ctl.standbys_of(new, w))
            if phase == 0:  # both tables in use
                serving |= set(ctl.pairs_of(old, w)) - set(ctl.standbys_of(old, w))
            assert not standbys & serving and standbys <= pairs, (phase, w)
        loads = sum(w.loads for w in launcher.workers)
        again = Controller({**CONFIG, "min_replicas": 2, "standby": "host"}, launcher, recovering=True)
        await again.table()
        assert sum(w.loads for w in launcher.workers) == loads, "the restart reloaded"
        for w in again.pool.workers:
            assert set(again.standbys_of(again.placement, w)) == set(ctl.standbys_of(new, w)), w
        await again.shutdown()
        await stop(ctl, gws)
    run(go())


def test_a_worker_that_dies_while_loading_comes_back_with_its_replicas():
    async def go():
        launcher, ctl, gws = await service()
        hot_load(ctl)
        launcher.die_on_next_load = True
        r = await ctl.rebalance(force=True)
        assert r["applied"] and len(launcher.died) == 1
        # the watch restarts it with what the new placement gives it
        w = ctl.pool.workers[launcher.died[0]]
        await eventually_async(lambda: w.restarts == 1 and w.healthy, what="the worker restarted")
        assert w.generation == 2
        hosted_as_placed(ctl, launcher)
        assert all(not g.violations for g in gws)
        await stop(ctl, gws)
    run(go())


def test_overlapping_rebalances_and_autoscaling_take_turns():
    async def go():
        launcher, ctl, gws = await service(gateways=2, replicas_per_worker=16)  # room for every expert on 2
        launcher.load_delay_s = 0.02
        hot_load(ctl)
        versions = []
        results = await asyncio.gather(ctl.rebalance(force=True), ctl.rebalance(force=True),
                                       ctl.rebalance(num_workers=2, force=True), ctl.rebalance(force=True))
        assert all(r["applied"] for r in results)
        versions = [r["version"] for r in results]
        assert versions == sorted(versions) and len(set(versions)) == 4  # one after another
        assert len(ctl.pool.workers) == 2 and ctl.placement.num_workers == 2
        assert not [w for w in launcher.workers if w.alive and w.worker_id == 2], "the removed worker still runs"
        hosted_as_placed(ctl, launcher)
        assert all(not g.violations for g in gws)
        await stop(ctl, gws)
    run(go())


def test_a_restarted_controller_adopts_the_workers_and_outnumbers_the_gateways_version():
    async def go():
        launcher, ctl, gws = await service()
        hot_load(ctl)
        await ctl.rebalance(force=True)
        held = gws[0].table
        loads = sum(w.loads for w in launcher.workers)
        gws[0].task.cancel()
        for t in ctl.tasks:  # the old controller's process is gone
            t.cancel()
        ctl.http.close()
        new = Controller(dict(CONFIG), launcher, recovering=True)
        t = await new.wait_for_table(held["version"], 5.0)  # what a gateway's next long poll sends
        assert t["version"] > held["version"] and t["ready"]
        assert t["addresses"] == held["addresses"] and t["routes"].keys() == held["routes"].keys()
        for layer, r in held["routes"].items():  # the same replicas (their split may differ)
            assert [sorted(x) for x in t["routes"][layer]["replicas"]] == [sorted(x) for x in r["replicas"]]
        assert sum(w.loads for w in launcher.workers) == loads and len(launcher.workers) == 3, "something reloaded"
        # and it keeps working: a worker loss, a rebalance
        new.pool.workers[0].handle.alive = False
        await new.pool.check(new.pool.workers[0])
        assert new.pool.workers[0].restarts == 1 and new.pool.workers[0].healthy
        assert (await new.rebalance(force=True))["applied"]
        hosted_as_placed(new, launcher)
        await new.shutdown()
        assert not [w for w in launcher.workers if w.alive], "shutdown left a worker running"
    run(go())


@pytest.mark.parametrize("min_replicas", [1, 2])
def test_a_worker_lost_while_the_controller_was_down_is_replaced_on_recovery(min_replicas):
    """The controller lost during a worker loss: its successor adopts the survivors, restarts the lost
    worker with its replicas, and converges to a ready table with every expert min_replicas times."""
    async def go():
        settings = dict(CONFIG, min_replicas=min_replicas)
        launcher, ctl, gws = await service(min_replicas=min_replicas)
        await stop(ctl, gws)
        launcher, ctl, gws = await service(min_replicas=min_replicas)
        pairs = set(ctl.pairs_of(ctl.placement, 2))
        for t in ctl.tasks:
            t.cancel()
        ctl.http.close()
        next(w for w in launcher.workers if w.worker_id == 2).alive = False
        new = Controller(settings, launcher, recovering=True)
        t = await new.wait_for_table(0, 5.0)
        assert t["ready"] and len(t["addresses"]) == 3
        assert launcher.hosting(new.pool.workers[2].address) == pairs
        assert new.placement.replica_counts().min() >= min_replicas
        assert (await new.rebalance(force=True))["applied"]  # and it plans on from there
        assert new.placement.replica_counts().min() >= min_replicas
        await new.shutdown()
    run(go())


def test_stats_while_load_reports_arrive_and_the_admin_key():
    """The HTTP surface runs on the controller's loop: /stats hammered while gateways report never sees a
    half-updated window. POST /rebalance needs the admin key; the read-only views do not."""
    async def go():
        launcher, ctl, gws = await service(admin_api_key="s3cret")
        host, port = (await ctl.http_address()).split(":")

        async def http(method: str, path: str, key: str | None = None) -> tuple[int, dict | str]:
            reader, writer = await asyncio.open_connection(host, int(port))
            auth = f"authorization: Bearer {key}\r\n" if key else ""
            writer.write(f"{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}\r\n".encode())
            raw = await reader.read()
            writer.close()
            head, _, body = raw.decode().partition("\r\n\r\n")
            status = int(head.split()[1])
            return status, json.loads(body) if body.startswith(("{", "[")) else body

        shape = (len(ctl.moe_layers), ctl.args.n_routed_experts)

        async def reports(n: int) -> None:
            for i in range(n):
                await ctl.report_load("gw-hammer", np.full(shape, i).tolist(), ctl.version, None)

        results = await asyncio.gather(reports(300), *(http("GET", "/stats") for _ in range(60)))
        stats = [r for r in results[1:]]
        assert all(code == 200 for code, _ in stats)
        # a whole window each time: the load of the first k reports (report i adds i to every cell), split
        # over the workers without a token lost or counted twice
        whole = {shape[0] * shape[1] * k * (k - 1) // 2 for k in range(301)}
        for _, body in stats:
            assert body["load_tokens"] in whole, body["load_tokens"]
            assert sum(body["worker_load"]) == pytest.approx(body["load_tokens"]), body["worker_load"]
        assert max(body["load_tokens"] for _, body in stats) > 0, "no /stats answered during the reports"
        assert (await http("GET", "/targets"))[0] == 200 and (await http("GET", "/metrics"))[0] == 200
        assert (await http("POST", "/rebalance"))[0] == 401
        assert (await http("POST", "/rebalance", "wrong"))[0] == 401
        code, body = await http("POST", "/rebalance?dry_run=1", "s3cret")
        assert code == 200 and body["applied"] is False
        assert "s3cret" not in json.dumps(ctl.stats()) and ctl.settings()["admin_api_key"] == "<redacted>"
        await stop(ctl, gws)
    run(go())


@pytest.mark.parametrize("files", [{"tls_cert_file": "c.pem"}, {"tls_ca_file": "ca.pem", "tls_key_file": "k.pem"}])
def test_partial_tls_settings_fail_at_startup(files):
    from moe_service.serving.config import ServiceConfig

    with pytest.raises(ValueError, match="needs tls_cert_file, tls_key_file and tls_ca_file"):
        ServiceConfig.from_dict({"model": "tiny", **files})
