"""The table gateways route with: the placement as per-layer replicas and shares, each worker's address,
and whether the service is ready or draining. Versioned and long-polled: every publication bumps the
version, and a gateway waits for one above its own."""

from __future__ import annotations

import asyncio
from typing import Callable

import numpy as np

from moe_service.placement import Placement, plan
from moe_service.placement.redundancy import standby_slots, with_standbys


class TableBoard:
    """`healthy()` gives the addresses of the workers healthy now (worker id -> host:port)."""

    def __init__(self, moe_layers: list[int], num_experts: int, healthy: Callable[[], dict[int, str]]) -> None:
        self.moe_layers, self.num_experts, self.healthy = moe_layers, num_experts, healthy
        self.version = 0
        self.placement: Placement | None = None
        self.ready = self.draining = False
        self.cond = asyncio.Condition()

    async def publish(self, placement: Placement | None = None, ready: bool | None = None,
                      draining: bool | None = None) -> int:
        """A new version (long polls return at once); returns it."""
        async with self.cond:
            if placement is not None:
                self.placement = placement
            if ready is not None:
                self.ready = ready
            if draining is not None:
                self.draining = draining
            self.version += 1
            self.cond.notify_all()
            return self.version

    def at_least(self, version: int) -> None:
        """Versions continue above `version` (one a gateway holds, or a clock reading after a restart)."""
        self.version = max(self.version, version)

    async def wait(self, newer_than: int, timeout_s: float) -> dict:
        """Long poll: the table as soon as its version is above `newer_than`, or after the timeout."""
        # asyncio.timeout, not wait_for: the condition's lock is taken and released in this one task
        # (wait_for runs the wait in a task of its own, and Python 3.11 can then lose the lock)
        async with self.cond:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.cond.wait_for(lambda: self.version > newer_than)
            except TimeoutError:
                pass
        return self.snapshot()

    def snapshot(self) -> dict:
        p = self.placement
        routes = {}
        if p is not None:
            for i, layer in enumerate(self.moe_layers):
                reps = [p.replicas(i, e) for e in range(self.num_experts)]
                shares = [[s for _, s in p.share(i, e)] for e in range(self.num_experts)]
                routes[layer] = {"replicas": reps, "shares": shares}
        healthy = self.healthy()
        covered = p is not None and all(any(w in healthy for w in p.replicas(i, e))
                                        for i in range(len(self.moe_layers)) for e in range(self.num_experts))
        return {"version": self.version, "routes": routes, "addresses": healthy, "ready": self.ready and covered,
                "draining": self.draining}


def rebuild_placement(found: dict[int, list[tuple[int, int]]], moe_layers: list[int], num_experts: int,
                      min_workers: int, replicas_per_worker: int,
                      standbys: dict[int, list[tuple[int, int]]] | None = None) -> tuple[Placement, list[int]]:
    """After the controller's loss: the placement the running workers host (`found`: worker id -> its
    (layer, expert) pairs; `standbys`: those they say are standbys, which get no share while their expert
    has another replica), and the workers lost meanwhile (ids below the highest found, or below
    `min_workers`, that no process holds). An expert whose every host was lost goes to a lost worker
    (which is restarted with it), round robin; with none lost, to the running workers in turn."""
    layer_index = {layer: i for i, layer in enumerate(moe_layers)}
    num_workers = max([min_workers - 1, *found]) + 1
    hosts = np.zeros((len(moe_layers), num_experts, num_workers), dtype=bool)
    for w, pairs in found.items():
        for layer, e in pairs:
            hosts[layer_index[layer], e, w] = True
    lost = [w for w in range(num_workers) if w not in found]
    for i, (l, e) in enumerate(np.argwhere(~hosts.any(axis=2))):
        hosts[l, e, lost[i % len(lost)] if lost else i % num_workers] = True
    serving = hosts.copy()
    for w, pairs in (standbys or {}).items():
        for layer, e in pairs:
            serving[layer_index[layer], e, w] = False
    serving = np.where(serving.any(axis=2, keepdims=True), serving, hosts)
    return Placement(hosts, serving / serving.sum(axis=2, keepdims=True), replicas_per_worker), lost


def initial_placement(workers: int, redundant_experts: int, num_layers: int, num_experts: int, slots: int,
                      min_replicas: int = 1) -> Placement:
    """The first placement: round robin, or with `redundant_experts` of each layer replicated; every expert
    on at least `min_replicas` workers."""
    if redundant_experts <= 0:
        active_slots = slots - standby_slots(num_experts, workers, min_replicas)
        return with_standbys(Placement.round_robin(num_layers, num_experts, workers, active_slots), min_replicas, slots)
    # the first `redundant_experts` experts of each layer look hot: the planner gives them more replicas
    load = np.ones((num_layers, num_experts))
    load[:, : redundant_experts] = 2.0 * workers
    return plan(load, workers, slots, min_replicas=min_replicas)
