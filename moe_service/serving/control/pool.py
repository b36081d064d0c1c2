"""The expert workers: start, watch, restart, load and stop them, through an injected launcher (Ray's
in the service, a fake in the protocol tests)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

log = logging.getLogger("moe_service.controller")

Pairs = list[tuple[int, int]]  # (layer, expert) replicas a worker hosts


class WorkerLost(Exception):
    """The worker's process is gone (or does not answer)."""


@dataclass
class Started:
    handle: Any
    address: str  # its gRPC server, host:port
    metrics: str  # its /metrics, host:port


@dataclass
class Found(Started):
    """A worker found running (after a controller restart): what it hosts, as it says."""

    worker_id: int = 0
    generation: int = 0
    pairs: Pairs = field(default_factory=list)
    standbys: Pairs = field(default_factory=list)  # those of `pairs` it keeps as standbys (standby: host)


class Launcher(Protocol):
    # `standbys`: which of `pairs` are standbys (kept in host memory under `standby: host`)
    async def start(self, worker_id: int, generation: int, pairs: Pairs, standbys: Pairs) -> Started: ...
    async def load(self, handle: Any, pairs: Pairs, standbys: Pairs) -> None: ...
    async def ping(self, handle: Any) -> dict | None: ...  # what the worker says of itself; WorkerLost if gone
    async def stop(self, handle: Any) -> None: ...
    async def running(self) -> list[Found]: ...  # the service's workers alive now
    async def stop_all(self) -> None: ...  # every worker of the service, starting or running, known or not


@dataclass
class Worker:
    """One worker id; the process behind it changes when it is restarted."""

    worker_id: int
    pairs: Pairs
    standbys: Pairs = field(default_factory=list)  # which of `pairs` are standbys
    handle: Any = None
    address: str | None = None
    metrics: str | None = None
    generation: int = 0
    restarts: int = 0
    healthy: bool = False
    info: dict | None = None  # its last answer to a ping (what it holds, its memory)


class WorkerPool:
    """`changed()` is called (and awaited) whenever the set of healthy workers or their addresses change:
    the controller publishes a new table then."""

    def __init__(self, launcher: Launcher, changed: Callable[[], Awaitable[None]], retry_s: float = 1.0) -> None:
        self.launcher, self.changed, self.retry_s = launcher, changed, retry_s
        self.workers: dict[int, Worker] = {}
        self.closed = False

    def healthy_addresses(self) -> dict[int, str]:
        return {w: s.address for w, s in self.workers.items() if s.healthy and s.address}

    async def start(self, worker_id: int, pairs: Pairs, generation: int = 0, standbys: Pairs = ()) -> Worker:
        """A new worker hosting `pairs`, after `generation` (one that ran before); raises if it does not start."""
        worker = self.workers[worker_id] = Worker(worker_id, sorted(pairs), sorted(standbys), generation=generation)
        await self._launch(worker)
        return worker

    def adopt(self, found: Found) -> None:
        """A worker that was already running (the controller restarted): nothing is reloaded."""
        self.workers[found.worker_id] = Worker(found.worker_id, sorted(map(tuple, found.pairs)),
                                               sorted(map(tuple, found.standbys)), found.handle, found.address,
                                               found.metrics, found.generation, healthy=True)

    async def _launch(self, worker: Worker) -> None:
        worker.generation += 1
        pairs, standbys = list(worker.pairs), list(worker.standbys)
        started = await self.launcher.start(worker.worker_id, worker.generation, pairs, standbys)
        worker.handle, worker.address, worker.metrics = started.handle, started.address, started.metrics
        if (worker.pairs, worker.standbys) != (pairs, standbys):  # a rebalance changed them while it started
            await self.launcher.load(worker.handle, worker.pairs, worker.standbys)
        worker.healthy = True

    async def check(self, worker: Worker) -> None:
        """Pings the worker; if it is gone, marks it down (published at once) and restarts it with the
        replicas it should host, until it is up or removed."""
        if worker.handle is None or not worker.healthy:
            return
        try:
            worker.info = await self.launcher.ping(worker.handle)
            return
        except WorkerLost as e:
            if not worker.healthy or self.workers.get(worker.worker_id) is not worker:
                return  # another check got here first, or the worker was removed meanwhile
            log.warning("expert worker %s is gone (%s); restarting it", worker.worker_id, e)
        worker.healthy = False
        await self.changed()  # gateways stop routing to it right away
        while not self.closed and self.workers.get(worker.worker_id) is worker:
            try:
                await self._launch(worker)
                worker.restarts += 1
                await self.changed()
                return
            except Exception as e:  # the replacement did not start: try again
                log.error("restarting expert worker %s failed: %s", worker.worker_id, e)
                await asyncio.sleep(self.retry_s)  # a retry period

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in list(self.workers.values())))

    async def load(self, wanted: dict[int, Pairs], standbys: dict[int, Pairs] | None = None) -> None:
        """Each listed worker hosts exactly those pairs from now on (`standbys[w]` of them as standbys). One
        that died meanwhile is not an error: `pairs` says what its replacement hosts, and the watch restarts it."""
        calls = []
        for w, pairs in wanted.items():
            worker = self.workers[w]
            pairs = sorted(map(tuple, pairs))
            spare = sorted(set(map(tuple, (standbys or {}).get(w, ()))) & set(pairs))
            if (pairs, spare) != (worker.pairs, worker.standbys):
                worker.pairs, worker.standbys = pairs, spare
                if worker.healthy:
                    calls.append(self.launcher.load(worker.handle, pairs, spare))
        for r in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(r, BaseException) and not isinstance(r, WorkerLost):
                raise r

    async def describe(self) -> dict[int, dict | None]:
        """Each healthy worker's answer to a ping now (None where it says nothing of itself)."""
        healthy = [w for w in self.workers.values() if w.healthy]
        for w, info in zip(healthy, await asyncio.gather(*(self.launcher.ping(w.handle) for w in healthy))):
            w.info = info
        return {w.worker_id: w.info for w in healthy}

    async def remove(self, worker_id: int) -> None:
        worker = self.workers.pop(worker_id)
        if worker.handle is not None:
            await self.launcher.stop(worker.handle)

    async def stop_all(self) -> None:
        self.closed = True
        for w in list(self.workers):
            await self.remove(w)
