"""The gateway's side of the controller: following the placement table (switched between steps; a newer
one for a layer call that lost workers) and counting routed (token, expert) pairs to report as load."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

import torch

from moe_service.engine.loop import EngineLoop
from moe_service.routing import LayerRoutes
from moe_service.serving.gateway.remote import RemoteExperts, RoutingTable, StepRecord
from moe_service.serving.metrics import GatewayMetrics

# L MoE layers, E experts per layer, W workload classes


def routing_table(t: dict) -> RoutingTable:
    """The controller's table as the gateway routes with it; workers without an address are left out."""
    addresses = {int(w): a for w, a in t["addresses"].items()}
    routes = {}
    for layer, r in t["routes"].items():
        workers = {w for reps in r["replicas"] for w in reps}
        routes[int(layer)] = LayerRoutes(int(layer), r["replicas"], r["shares"]).without(workers - set(addresses))
    return RoutingTable(t["version"], routes, addresses)


@dataclass
class ControllerLink:
    """What the gateway needs from the controller, as plain async callables (tests may fake them)."""

    table: Callable[[], Awaitable[dict]]
    wait_for_table: Callable[[int, float], Awaitable[dict]]
    report_unavailable: Callable[[int], Awaitable[None]]
    report_load: Callable[[str, list, int, str | None], Awaitable[None]]


def spawn(coro: Awaitable) -> None:
    """Runs a controller call in the background; a failure (the controller restarting) is dropped."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


class RoutingCounter:
    """Routed pairs per (MoE layer, expert) and tokens per layer since the last report, taken from each
    step's records (one bincount per micro-batch) on the engine thread and collected on the event loop."""

    def __init__(self, moe_layers: list[int], num_experts: int, workloads: int = 0) -> None:
        self.index = {layer: i for i, layer in enumerate(moe_layers)}
        self.L, self.E, self.W = len(moe_layers), num_experts, workloads
        self.steps: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = deque()  # appended, popped: no lock

    def add(self, records: list[StepRecord]) -> None:
        for r in records:
            if not r.routed:
                continue
            # the main model's calls share T (a micro-batch's rows); a draft layer's (speculative decoding) have theirs
            for size in {ids.shape[0] for _, ids in r.routed}:
                calls = [(layer, ids) for layer, ids in r.routed if ids.shape[0] == size]
                offsets = torch.tensor([self.index[layer] for layer, _ in calls])  # [n] layer index per call
                ids = torch.stack([ids for _, ids in calls])  # [n, T, K]
                keys = offsets[:, None, None] * self.E + ids
                counts = torch.bincount(keys.reshape(-1), minlength=self.L * self.E).view(self.L, self.E)
                tokens = torch.bincount(offsets, minlength=self.L) * ids.shape[1]
                by_workload = None
                if self.W and r.workloads is not None and r.workloads.shape[0] == size:
                    wk = (offsets[:, None, None] * self.W + r.workloads[None, :, None]) * self.E + ids
                    by_workload = torch.bincount(wk.reshape(-1), minlength=self.L * self.W * self.E).view(
                        self.L, self.W, self.E)
                self.steps.append((counts, tokens, by_workload))

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pairs [L, E], tokens [L], pairs by workload [L, W, E] or None) since the last take."""
        counts, tokens = torch.zeros(self.L, self.E, dtype=torch.long), torch.zeros(self.L, dtype=torch.long)
        by_workload = torch.zeros(self.L, self.W, self.E, dtype=torch.long) if self.W else None
        while self.steps:
            c, t, w = self.steps.popleft()
            counts += c
            tokens += t
            if w is not None:
                by_workload += w
        return counts, tokens, by_workload


class TableFollower:
    """Follows the controller's table on the event loop that runs `follow()`. `latest` is the newest table
    published; the step's own is `remote.table`, switched on the engine thread between steps."""

    def __init__(self, controller: ControllerLink) -> None:
        self.controller = controller
        self.info: dict = {}
        self.latest: RoutingTable | None = None
        self.cond = threading.Condition()  # layer calls waiting for a newer table
        self.loop: asyncio.AbstractEventLoop | None = None

    async def first(self) -> RoutingTable:
        """The controller's first table with every expert ready."""
        self.loop = asyncio.get_running_loop()
        t = await self.controller.table()
        while not t["ready"]:
            t = await self.controller.wait_for_table(t["version"], 5.0)
        self.info, self.latest = t, routing_table(t)
        return self.latest

    def wait_for_table(self, excluded: set[int], version: int, wait_s: float) -> RoutingTable | None:
        """A table newer than `version` for a layer call that lost `excluded` workers (from a model thread),
        or None after `wait_s`. It is that call's alone: the gateway switches its own table only between
        steps (the controller drops old replicas once every gateway routes with the new version, so a
        step in flight keeps its own)."""
        for w in excluded:
            self.loop.call_soon_threadsafe(spawn, self.controller.report_unavailable(w))
        with self.cond:
            self.cond.wait_for(lambda: self.latest.version > version, wait_s)
            latest = self.latest
        return latest if latest.version > version else None

    async def follow(self, engine: EngineLoop, remote: RemoteExperts, confirm: Callable[[], Awaitable[None]],
                     stopped: Callable[[], bool]) -> None:
        version = self.info["version"]
        while not stopped():
            try:
                t = await self.controller.wait_for_table(version, 10.0)
            except Exception:  # the controller restarting: keep the table we have, try again
                await asyncio.sleep(1.0)
                continue
            if t["version"] <= version:
                continue
            version = t["version"]
            table = routing_table(t)
            with self.cond:  # calls waiting for a table take it at once
                self.info, self.latest = t, table
                self.cond.notify_all()
            # the switch is a job on the engine thread, between steps (at once when idle). It is not awaited
            # here: a step waiting for this very table (a lost worker) must not hold up polling for the next
            # one. Once switched, say so at once: the controller drops old replicas only after every gateway
            # routes with the new version.
            job = engine.run_job(lambda table=table: table.version > remote.table.version and remote.switch(table))
            job.add_done_callback(lambda _: self.loop.call_soon_threadsafe(spawn, confirm()))


async def report_load(counter: RoutingCounter, metrics: GatewayMetrics, moe_layers: list[int],
                      report: Callable[[list], Awaitable[None]], interval_s: float, stopped: Callable[[], bool]) -> None:
    """Every `interval_s`, the routed pairs since the last report to the metrics and to the controller. The
    first report goes out at once: it also registers this gateway's metrics endpoint as a scrape target."""
    first = True
    while not stopped():
        if not first:
            await asyncio.sleep(interval_s)  # the reporting period
        first = False
        counts, tokens, by_workload = counter.take()
        for layer, row, n in zip(moe_layers, counts.tolist(), tokens.tolist()):
            if n:
                metrics.observe_routing(layer, row)
                metrics.layer_tokens.labels(str(layer)).inc(n)
        if by_workload is not None:
            for layer, rows in zip(moe_layers, by_workload.tolist()):
                for workload, row in zip(metrics.workloads, rows):
                    for e, n in enumerate(row):
                        if n:
                            metrics.routed_by_workload.labels(str(layer), str(e), workload).inc(n)
        try:
            await report(counts.tolist())
        except Exception:  # the controller restarting: these counts are lost, the next ones arrive
            pass
