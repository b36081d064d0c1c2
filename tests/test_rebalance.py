"""Hot experts under continuous load: live rebalancing and worker autoscaling change no output and
fail no request."""

from __future__ import annotations

import asyncio

import pytest
import torch
from ray import serve

from moe_service import load_model
from moe_service.bench.soak_bench import GapClients
from moe_service.client import Client
from moe_service.engine.engine import Engine
from moe_service.cli.views import fetch
from moe_service.engine.sampling import SamplingParams
from moe_service.serving.config import APP_NAME, CONTROLLER_NAME, NAMESPACE, ServiceConfig
from moe_service.serving.control.ray_launcher import RayLauncher
from moe_service.serving.local import start_service
from tests.support import Pending, eventually, eventually_async

pytestmark = pytest.mark.slow
PRESET = "tiny-skewed"


def config(**kw) -> dict:
    base = dict(model=PRESET, workers=2, gpus_per_worker=1.0, gateway_num_cpus=0, expert_bind_host="127.0.0.1",
                scheduler={"max_running": 8, "max_seq_len": 256}, sd_port=0, rebalance_interval_s=0,
                load_report_interval_s=0.2, rebalance_min_gain=0.0)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def prompts_and_reference():
    g = torch.Generator().manual_seed(11)
    prompts = [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12, 3)]
    engine = Engine(load_model(PRESET))
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    return prompts, [engine.generate([p], params)[0].output for p in prompts]


class Load(GapClients):
    """The soak benchmark's clients (every result checked), waited on by progress."""

    def wait_for(self, n: int, timeout_s: float = 120) -> None:
        """Until the clients have finished `n` more requests; a client's error fails at once."""
        target = self.done + n

        def progressed():
            assert not self.failed, self.failed[:3]
            return self.done >= target or Pending(f"{self.done} of {target} requests done")

        eventually(progressed, timeout_s, what="the clients' progress")


def test_live_rebalance_under_load_changes_no_output(ray_local, prompts_and_reference):
    prompts, reference = prompts_and_reference
    svc = start_service(config())
    try:
        http = ray_local.get(svc.controller().http_address.remote())
        load = Load(svc.address, prompts, reference, clients=3)
        try:
            load.wait_for(6)
            before = fetch(http, "/stats")
            dry = fetch(http, "/rebalance?dry_run=1", method="POST")
            assert dry["applied"] is False
            assert sum(dry["balancedness_after"]) > sum(dry["balancedness_before"])
            assert fetch(http, "/stats")["version"] == before["version"], "a dry run changed the table"
            applied = fetch(http, "/rebalance", method="POST")
            assert applied["applied"] and applied["version"] > before["version"]
            assert applied["gateways_switched"], "the gateway did not confirm the new table"
            load.wait_for(6)  # traffic continues on the new placement
        finally:
            load.finish()
        assert not load.failed, load.failed[:3]
        assert not load.wrong, load.wrong[:3]
        after = fetch(http, "/stats")
        replicas = sum(len(v) for v in after["placement"].values())
        assert replicas > 2 * 16, "no hot expert got an extra replica"
        assert sum(after["balancedness"].values()) > sum(before["balancedness"].values())
        # with no traffic the gateway has no step to switch before: it must switch (and say so) anyway,
        # or the controller keeps old replicas until its bound runs out
        idle = fetch(http, "/rebalance", method="POST")
        assert idle["applied"] and idle["gateways_switched"], "an idle gateway did not confirm the new table"
        with Client(svc.address) as c:
            assert c.generate_ids(prompts[0], max_new_tokens=24, ignore_eos=True) == reference[0]
    finally:
        svc.shutdown()


def test_autoscaler_adds_and_removes_a_worker_without_failures(ray_local, prompts_and_reference):
    prompts, reference = prompts_and_reference
    # a tiny target: any traffic is overload for one worker; no traffic is underload for two
    auto = dict(min_workers=1, max_workers=2, target_load_per_worker=1.0, upscale_delay_s=0.5,
                downscale_delay_s=1.0, look_back_period_s=0.5)
    svc = start_service(config(workers=1, autoscaling=auto, replicas_per_worker=16))
    ctl = svc.controller()

    def workers() -> int:
        return len(ray_local.get(ctl.worker_info.remote()))

    try:
        load = Load(svc.address, prompts, reference, clients=2)
        try:
            def added() -> bool:
                assert not load.failed, load.failed[:3]
                return workers() == 2

            eventually(added, 90, interval=0.2, what="a worker added under load")
            load.wait_for(4)  # served by two workers now
        finally:
            load.finish()
        eventually(lambda: workers() == 1, 90, interval=0.2, what="the idle worker removed")
        assert not load.failed, load.failed[:3]
        assert not load.wrong, load.wrong[:3]
        with Client(svc.address) as c:  # and the service still answers exactly
            assert c.generate_ids(prompts[0], max_new_tokens=24, ignore_eos=True) == reference[0]
        # every gateway thread's stream to the removed worker was closed when the table switched
        left = {w["address"] for w in ray_local.get(ctl.worker_info.remote())}
        streams = set(serve.get_app_handle("moe").debug_state.remote().result()["expert_streams"])
        assert streams and streams <= left, (streams, left)
    finally:
        svc.shutdown()


def test_losing_the_controller_stops_no_traffic_and_reloads_nothing(ray_local, prompts_and_reference):
    """The controller is killed during streams and again while idle: Ray restarts it, it adopts the running
    workers (no expert is loaded again), gateways keep serving on their table meanwhile, and afterwards a
    rebalance and a worker loss are handled as before."""
    prompts, reference = prompts_and_reference
    svc = start_service(config())
    ctl = svc.controller()

    def loads() -> dict[str, int]:
        out = {}
        for w in ray_local.get(ctl.worker_info.remote()):
            actor = ray_local.get_actor(w["actor_name"], namespace="moe_service")
            out[w["address"]] = ray_local.get(actor.ping.remote())["loads"]
        return out

    try:
        before = loads()
        load = Load(svc.address, prompts, reference, clients=2)
        try:
            load.wait_for(3)
            ray_local.kill(ctl, no_restart=False)  # during streams
            load.wait_for(6)  # the streams go on meanwhile
            assert loads() == before, "the restarted controller reloaded or replaced a worker"
        finally:
            load.finish()
        assert not load.failed, load.failed[:3]
        assert not load.wrong, load.wrong[:3]
        ray_local.kill(ctl, no_restart=False)  # idle
        with Client(svc.address) as c:
            assert c.generate_ids(prompts[1], max_new_tokens=24, ignore_eos=True) == reference[1]
        assert loads() == before
        # and the control plane still works: a rebalance, a worker lost and replaced
        http = ray_local.get(ctl.http_address.remote())
        assert fetch(http, "/rebalance", method="POST")["applied"]
        victim = ray_local.get(ctl.worker_info.remote())[0]
        ray_local.kill(ray_local.get_actor(victim["actor_name"], namespace="moe_service"))
        def replaced():
            w = ray_local.get(ctl.worker_info.remote())[0]
            if w["generation"] > victim["generation"] and w["healthy"]:
                return True
            version = ray_local.get(ctl.table.remote())["version"]
            ray_local.get(ctl.wait_for_table.remote(version, 1.0))  # the wait: until the table changes
            return Pending(w)

        eventually(replaced, 60, interval=0, what="the lost worker replaced")
        with Client(svc.address) as c:
            assert c.generate_ids(prompts[0], max_new_tokens=24, ignore_eos=True) == reference[0]
    finally:
        svc.shutdown()
    assert not [n for n in ray_local.util.list_named_actors() if "_worker_" in n], "shutdown left workers running"


def test_a_worker_still_starting_is_never_left_running(ray_local):
    """Expert workers are detached actors named after the service and its worker ids. One whose start the
    controller abandons (its task is cancelled: the service is shut down while the autoscaler adds it) must
    die, and the shutdown's sweep must return only once every worker's name is free, or the next service
    on the cluster cannot start its workers ("The name moe_controller_worker_1_g1 is already taken": CI)."""
    launcher = RayLauncher(ServiceConfig.from_dict(config()), None, "abandoned")
    pairs = [(load_model(PRESET).args.moe_layers[0], 0)]

    def named() -> set[str]:
        return {a["name"] for a in ray_local.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("abandoned_")}

    async def scenario() -> None:
        start = asyncio.ensure_future(launcher.start(0, 1, pairs))
        # until the task has created the actor and waits for it to start
        await eventually_async(lambda: named() == {"abandoned_worker_0_g1"}, 60, what="the worker's actor created")
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        assert not named(), "an abandoned start left its worker running"

        start = asyncio.ensure_future(launcher.start(1, 1, pairs))  # a start nobody will cancel ...
        await eventually_async(named, 60, what="the worker's actor created")
        await launcher.stop_all()  # ... swept while it is still starting
        assert not named(), "the sweep returned before the worker was gone"
        with pytest.raises(RuntimeError, match="failed to start"):
            await start
        started = await launcher.start(1, 1, pairs)  # its name is free again
        assert started.address
        await launcher.stop_all()
        assert not named()

    asyncio.run(scenario())


def test_a_service_whose_workers_cannot_be_placed_says_why(ray_local):
    """Serve reports only that the gateway failed to deploy; start_service adds the replica's own error."""
    with pytest.raises(RuntimeError, match=r"expert worker \d did not start within 1s; it asks for 16.0 GPU"):
        start_service(config(gpus_per_worker=16.0, worker_start_timeout_s=1))
    ray_local.kill(ray_local.get_actor(CONTROLLER_NAME, namespace=NAMESPACE))
    serve.delete(APP_NAME)
    assert not [n for n in ray_local.util.list_named_actors() if "_worker_" in n], "a worker was left running"
