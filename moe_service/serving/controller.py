"""The controller: a named, detached actor owning the placement table, the expert workers' lifecycle
(start, health, restart, stop) and their addresses. Gateways read the table from it."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from moe_service.checkpoint import open_source
from moe_service.placement.placement import Placement
from moe_service.serving.config import CONTROLLER_NAME, NAMESPACE, ServiceConfig
from moe_service.serving.worker import ExpertWorkerActor
from moe_service.transport.options import TLSConfig

log = logging.getLogger("moe_service.controller")


@dataclass
class WorkerSlot:
    """One logical worker id; the actor behind it changes when it is restarted."""

    worker_id: int
    handle: object = None
    address: str | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)
    generation: int = 0
    restarts: int = 0
    healthy: bool = False


def initial_placement(cfg: ServiceConfig, num_layers: int, num_experts: int) -> Placement:
    slots = cfg.slots_per_worker or math.ceil(1.25 * num_experts / cfg.workers)
    if cfg.redundant_experts <= 0:
        return Placement.round_robin(num_layers, num_experts, cfg.workers, slots)
    from moe_service.placement import plan

    # the first `redundant_experts` experts of each layer look twice as hot: the planner gives them
    # a second replica on another worker
    load = np.ones((num_layers, num_experts))
    load[:, : cfg.redundant_experts] = 2.0 * cfg.workers
    return plan(load, cfg.workers, slots)


class Controller:
    def __init__(self, config: dict) -> None:
        self.cfg = ServiceConfig.from_dict(config)
        self.args = open_source(self.cfg.model).args
        self.moe_layers = self.args.moe_layers
        self.version = 0
        self.placement: Placement | None = None
        self.workers: dict[int, WorkerSlot] = {}
        self.cond = asyncio.Condition()
        self.ready = False
        self.draining = False
        self.monitor: asyncio.Task | None = None
        self.tls = (TLSConfig(self.cfg.tls_cert_file, self.cfg.tls_key_file, self.cfg.tls_ca_file)
                    if self.cfg.tls_cert_file else None)
        self.load = np.zeros((len(self.moe_layers), self.args.n_routed_experts))

    # ---- lifecycle ---------------------------------------------------------------------------

    def _pairs(self, worker_id: int) -> list[tuple[int, int]]:
        assert self.placement is not None
        return [(self.moe_layers[l], e) for l, e in self.placement.hosted(worker_id)]

    async def _spawn(self, slot: WorkerSlot) -> None:
        cfg = self.cfg
        slot.generation += 1
        opts: dict = {"num_gpus": cfg.gpus_per_worker, "num_cpus": cfg.cpus_per_worker,
                      "name": f"moe_worker_{slot.worker_id}_{slot.generation}", "namespace": NAMESPACE}
        if cfg.worker_resources:
            opts["resources"] = dict(cfg.worker_resources)
        if cfg.spread_workers:
            opts["scheduling_strategy"] = "SPREAD"
        handle = ExpertWorkerActor.options(**opts).remote(
            slot.worker_id, cfg.model, cfg.dtype, self.placement.slots_per_worker, cfg.expert_bind_host, self.tls)
        slot.handle, slot.pairs = handle, self._pairs(slot.worker_id)
        try:
            slot.address = await asyncio.wait_for(handle.start.remote(slot.pairs), cfg.worker_start_timeout_s)
        except asyncio.TimeoutError:
            ray.kill(handle)
            raise RuntimeError(
                f"expert worker {slot.worker_id} did not start within {cfg.worker_start_timeout_s:.0f}s; it asks for "
                f"{cfg.gpus_per_worker} GPU(s) and {cfg.worker_resources or 'no custom resources'}: does the cluster "
                f"have (or can its autoscaler add) a node with them?") from None
        except Exception as e:
            ray.kill(handle)
            raise RuntimeError(f"expert worker {slot.worker_id} failed to start: {e}") from e
        slot.healthy = True

    async def start(self) -> dict:
        """Place the experts, start every worker, publish table version 1. Fails loudly."""
        if self.ready:
            return self.table()
        self.placement = initial_placement(self.cfg, len(self.moe_layers), self.args.n_routed_experts)
        self.workers = {w: WorkerSlot(w) for w in range(self.cfg.workers)}
        results = await asyncio.gather(*(self._spawn(s) for s in self.workers.values()), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for s in self.workers.values():
                if s.handle is not None:
                    ray.kill(s.handle)
            raise errors[0]
        await self._publish(ready=True)
        self.monitor = asyncio.get_running_loop().create_task(self._monitor())
        return self.table()

    async def _publish(self, ready: bool | None = None) -> None:
        async with self.cond:
            if ready is not None:
                self.ready = ready
            self.version += 1
            self.cond.notify_all()

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)  # a polling period, not a synchronisation
            for slot in list(self.workers.values()):
                await self._check(slot)

    async def _check(self, slot: WorkerSlot) -> None:
        try:
            await asyncio.wait_for(slot.handle.ping.remote(), timeout=max(2.0, 4 * self.cfg.health_interval_s))
            return
        except (RayActorError, asyncio.TimeoutError, GetTimeoutError) as e:
            log.warning("expert worker %s is gone (%s); restarting it", slot.worker_id, type(e).__name__)
        slot.healthy = False
        await self._publish()  # gateways stop routing to it right away
        while not self.draining:
            try:
                await self._spawn(slot)
                slot.restarts += 1
                await self._publish()
                return
            except RuntimeError as e:
                log.error("restarting expert worker %s failed: %s", slot.worker_id, e)
                await asyncio.sleep(1.0)

    async def report_unavailable(self, worker_id: int) -> None:
        """A gateway could not reach a worker: check it now instead of at the next tick."""
        slot = self.workers.get(worker_id)
        if slot is not None and slot.healthy:
            await self._check(slot)

    async def drain(self) -> None:
        """Gateways report NOT_SERVING from now on (before a shutdown or a rollout)."""
        self.draining = True
        await self._publish()

    async def shutdown(self) -> None:
        self.draining = True
        if self.monitor is not None:
            self.monitor.cancel()
        for slot in self.workers.values():
            if slot.handle is not None:
                try:
                    await asyncio.wait_for(slot.handle.stop.remote(), 5)
                except Exception:
                    pass
                ray.kill(slot.handle)
        self.workers = {}
        await self._publish(ready=False)

    # ---- what gateways read ------------------------------------------------------------------

    def table(self) -> dict:
        p = self.placement
        routes = {}
        if p is not None:
            for i, layer in enumerate(self.moe_layers):
                reps = [p.replicas(i, e) for e in range(self.args.n_routed_experts)]
                shares = [[s for _, s in p.share(i, e)] for e in range(self.args.n_routed_experts)]
                routes[layer] = {"replicas": reps, "shares": shares}
        healthy = {w: s.address for w, s in self.workers.items() if s.healthy and s.address}
        covered = p is not None and all(
            any(w in healthy for w in p.replicas(i, e))
            for i in range(len(self.moe_layers)) for e in range(self.args.n_routed_experts))
        return {"version": self.version, "routes": routes, "addresses": healthy, "ready": self.ready and covered,
                "draining": self.draining}

    async def wait_for_table(self, newer_than: int, timeout_s: float = 10.0) -> dict:
        """Long poll: returns as soon as the version is above `newer_than`, or after the timeout."""
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: self.version > newer_than), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.table()

    def worker_info(self) -> list[dict]:
        return [{"worker_id": w, "address": s.address, "healthy": s.healthy, "restarts": s.restarts,
                 "generation": s.generation, "experts": len(s.pairs),
                 "actor_name": f"moe_worker_{w}_{s.generation}"} for w, s in sorted(self.workers.items())]

    def config(self) -> dict:
        return self.cfg.to_dict()


ControllerActor = ray.remote(num_cpus=0, max_concurrency=64)(Controller)


def get_or_create_controller(config: dict, start_timeout_s: float | None = None):
    """The named detached controller for this config (created if absent) after `start()` succeeded."""
    # pinned to the head node (as Serve pins its own controller): it must outlive any worker node
    handle = ControllerActor.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        resources={"node:__internal_head__": 0.001}).remote(config)
    ray.get(handle.start.remote(), timeout=start_timeout_s)
    return handle


def get_controller():
    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
