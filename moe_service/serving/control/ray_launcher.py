"""Expert workers as detached Ray actors with names derived from the service, so a restarted controller
finds them (and a lost one is replaced under the next generation's name)."""

from __future__ import annotations

import asyncio
import re

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from moe_service.serving.config import NAMESPACE, ServiceConfig
from moe_service.serving.control.pool import Found, Pairs, Started, WorkerLost
from moe_service.serving.worker import ExpertWorkerActor
from moe_service.transport.options import TLSConfig

class RayLauncher:
    """Workers named `<service>_worker_<id>_g<generation>`, `service` being the controller's own name."""

    def __init__(self, cfg: ServiceConfig, replicas_per_layer: int, tls: TLSConfig | None, service: str) -> None:
        self.cfg, self.replicas_per_layer, self.tls, self.service = cfg, replicas_per_layer, tls, service
        self.pattern = re.compile(rf"^{re.escape(service)}_worker_(\d+)_g(\d+)$")

    def name(self, worker_id: int, generation: int) -> str:
        return f"{self.service}_worker_{worker_id}_g{generation}"

    async def start(self, worker_id: int, generation: int, pairs: Pairs) -> Started:
        cfg = self.cfg
        opts: dict = {"num_gpus": cfg.gpus_per_worker, "num_cpus": cfg.cpus_per_worker, "lifetime": "detached",
                      "name": self.name(worker_id, generation), "namespace": NAMESPACE}
        if cfg.worker_resources:
            opts["resources"] = dict(cfg.worker_resources)
        if cfg.spread_workers:
            opts["scheduling_strategy"] = "SPREAD"
        handle = ExpertWorkerActor.options(**opts).remote(
            worker_id, cfg.model, cfg.dtype, self.replicas_per_layer, cfg.expert_bind_host, self.tls, cfg.torch_threads,
            cfg.expert_port_range, cfg.metrics_port_range, cfg.simulate)
        try:
            addrs = await asyncio.wait_for(handle.start.remote(pairs), cfg.worker_start_timeout_s)
        except asyncio.TimeoutError:
            ray.kill(handle)
            raise RuntimeError(
                f"expert worker {worker_id} did not start within {cfg.worker_start_timeout_s:.0f}s; it asks for "
                f"{cfg.gpus_per_worker} GPU(s) and {cfg.worker_resources or 'no custom resources'}: does the cluster "
                f"have (or can its autoscaler add) a node with them?") from None
        except Exception as e:
            ray.kill(handle)
            raise RuntimeError(f"expert worker {worker_id} failed to start: {e}") from e
        return Started(handle, addrs["address"], addrs["metrics"])

    async def load(self, handle, pairs: Pairs) -> None:
        try:
            await handle.load.remote(pairs)
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
        ray.kill(handle)

    async def running(self) -> list[Found]:
        latest: dict[int, int] = {}
        for name in ray.util.list_named_actors(all_namespaces=True):
            if isinstance(name, dict):
                if name.get("namespace") != NAMESPACE:
                    continue
                name = name["name"]
            m = self.pattern.match(name)
            if m:
                w, g = int(m.group(1)), int(m.group(2))
                latest[w] = max(g, latest.get(w, 0))
        found = []
        for w, g in sorted(latest.items()):
            try:
                handle = ray.get_actor(self.name(w, g), namespace=NAMESPACE)
                info = await self.ping(handle)
            except (ValueError, WorkerLost):
                continue
            if info.get("address"):
                found.append(Found(handle, info["address"], info["metrics"], w, g, [tuple(p) for p in info["hosted"]]))
        return found
