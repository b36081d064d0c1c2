"""Expert workers as detached Ray actors with names derived from the service, so a restarted controller
finds them (and a lost one is replaced under the next generation's name)."""

from __future__ import annotations

import asyncio
import re
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from moe_service.serving.config import NAMESPACE, ServiceConfig
from moe_service.serving.control.pool import Found, Pairs, Started, WorkerLost
from moe_service.serving.worker.actor import ExpertWorkerActor
from moe_service.transport.options import TLSConfig

class RayLauncher:
    """Workers named `<service>_worker_<id>_g<generation>`, `service` being the controller's own name."""

    def __init__(self, cfg: ServiceConfig, tls: TLSConfig | None, service: str) -> None:
        self.cfg, self.tls, self.service = cfg, tls, service
        self.pattern = re.compile(rf"^{re.escape(service)}_worker_(\d+)_g(\d+)$")

    def name(self, worker_id: int, generation: int) -> str:
        return f"{self.service}_worker_{worker_id}_g{generation}"

    async def start(self, worker_id: int, generation: int, pairs: Pairs, standbys: Pairs = ()) -> Started:
        cfg = self.cfg
        opts: dict = {"num_gpus": cfg.gpus_per_worker, "num_cpus": cfg.cpus_per_worker, "lifetime": "detached",
                      "name": self.name(worker_id, generation), "namespace": NAMESPACE}
        if cfg.worker_resources:
            opts["resources"] = dict(cfg.worker_resources)
        if cfg.spread_workers:
            opts["scheduling_strategy"] = "SPREAD"
        handle = ExpertWorkerActor.options(**opts).remote(
            worker_id, cfg.model, cfg.dtype, cfg.quantize, cfg.expert_bind_host, self.tls, cfg.torch_threads,
            cfg.expert_port_range, cfg.metrics_port_range, cfg.simulate, cfg.standby)
        try:
            addrs = await asyncio.wait_for(handle.start.remote(pairs, standbys), cfg.worker_start_timeout_s)
        except BaseException as e:  # it did not start, or the controller stopped waiting (shutting down)
            await _kill(handle)
            if isinstance(e, asyncio.TimeoutError):
                raise RuntimeError(
                    f"expert worker {worker_id} did not start within {cfg.worker_start_timeout_s:.0f}s; it asks for "
                    f"{cfg.gpus_per_worker} GPU(s) and {cfg.worker_resources or 'no custom resources'}: does the "
                    f"cluster have (or can its autoscaler add) a node with them?") from None
            if isinstance(e, Exception):
                raise RuntimeError(f"expert worker {worker_id} failed to start: {e}") from e
            raise
        return Started(handle, addrs["address"], addrs["metrics"])

    async def load(self, handle, pairs: Pairs, standbys: Pairs = ()) -> None:
        try:
            await handle.load.remote(pairs, standbys)
        except RayActorError as e:
            raise WorkerLost(type(e).__name__) from None

    async def ping(self, handle) -> dict:
        try:
            return await asyncio.wait_for(handle.ping.remote(), timeout=max(2.0, 4 * self.cfg.health_interval_s))
        except (RayActorError, asyncio.TimeoutError, GetTimeoutError) as e:
            raise WorkerLost(type(e).__name__) from None

    async def stop(self, handle) -> None:
        try:
            await asyncio.wait_for(handle.stop.remote(), 5)
        except Exception:  # gone already, or stuck: killed below either way
            pass
        finally:  # also when the caller is cancelled meanwhile
            await _kill(handle)

    async def stop_all(self) -> None:
        handles = []
        for name in self._names():
            try:
                handles.append(ray.get_actor(name, namespace=NAMESPACE))
            except ValueError:  # gone meanwhile
                pass
        await asyncio.gather(*map(_kill, handles))

    def _names(self) -> list[str]:
        """Every actor named after this service, starting or running."""
        names = []
        for name in ray.util.list_named_actors(all_namespaces=True):
            if isinstance(name, dict):
                if name.get("namespace") != NAMESPACE:
                    continue
                name = name["name"]
            if self.pattern.match(name):
                names.append(name)
        return names

    async def running(self) -> list[Found]:
        latest: dict[int, int] = {}
        for name in self._names():
            w, g = map(int, self.pattern.match(name).groups())
            latest[w] = max(g, latest.get(w, 0))
        found = []
        for w, g in sorted(latest.items()):
            try:
                handle = ray.get_actor(self.name(w, g), namespace=NAMESPACE)
                info = await self.ping(handle)
            except (ValueError, WorkerLost):
                continue
            if info.get("address"):
                found.append(Found(handle, info["address"], info["metrics"], w, g, [tuple(p) for p in info["hosted"]],
                                   [tuple(p) for p in info.get("parked", ())]))
        return found


async def _kill(handle, timeout_s: float = 10.0) -> None:
    """Kills a worker and returns once it is dead, its name free for the next one: ray.kill only sends the
    request (the GCS frees the name as it acts on it), and a call may still be answered before it lands."""
    ray.kill(handle)
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(handle.ping.remote(), left)
        except Exception:  # dead (or silent past the deadline)
            return
        await asyncio.sleep(0.05)  # answered before the kill landed: ask again
