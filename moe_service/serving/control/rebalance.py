"""The rebalance protocol: load new replicas next to the old ones, publish the new table, wait until
every gateway routes with it, then drop the replicas that moved away. No call ever finds a replica
gone that its table names (a gateway switches tables between steps, and confirms only then)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from moe_service.placement import Placement
from moe_service.serving.control.pool import Pairs, WorkerPool


@dataclass(frozen=True)
class ProtocolSettings:
    confirm_timeout_s: float = 30.0  # how long to wait for gateways before dropping old replicas anyway
    gateway_recent_s: float = 10.0  # a gateway that reported this recently must confirm


class Gateways:
    """What each gateway last said: when, and which table version it routes with."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[float, int]] = {}
        self.cond = asyncio.Condition()

    async def report(self, gateway: str, version: int) -> None:
        async with self.cond:
            self.seen[gateway] = (time.monotonic(), version)
            self.cond.notify_all()

    def highest_version(self) -> int:
        return max((v for _, v in self.seen.values()), default=0)

    async def wait_confirmed(self, version: int, settings: ProtocolSettings) -> bool:
        """Until every gateway heard from recently routes with `version` (True), or the timeout (False)."""
        def done() -> bool:
            now = time.monotonic()
            return all(v >= version for t, v in self.seen.values() if t > now - settings.gateway_recent_s)

        async with self.cond:
            try:
                async with asyncio.timeout(settings.confirm_timeout_s):  # in this task (see Controller.wait_for_table)
                    await self.cond.wait_for(done)
                return True
            except TimeoutError:
                return False


async def apply_placement(new: Placement, pairs_of: Callable[[Placement, int], Pairs], pool: WorkerPool,
                          publish: Callable[[Placement], Awaitable[int]], gateways: Gateways,
                          settings: ProtocolSettings) -> bool:
    """Moves the service to `new` (its worker count may differ); True if every gateway confirmed the new
    table before the old replicas went. `publish` installs the placement and returns the table version."""
    # 1. new workers start with their replicas; existing ones load what they gain, keeping what they lose
    for w in range(new.num_workers):
        if w not in pool.workers:
            await pool.start(w, pairs_of(new, w))
    await pool.load({w: sorted(set(worker.pairs) | set(pairs_of(new, w)) if w < new.num_workers else worker.pairs)
                     for w, worker in pool.workers.items()})
    # 2. gateways switch between steps, and say so
    version = await publish(new)
    confirmed = await gateways.wait_confirmed(version, settings)
    # 3. what moved away goes; workers beyond the new count stop
    for w in [w for w in pool.workers if w >= new.num_workers]:
        await pool.remove(w)
    await pool.load({w: pairs_of(new, w) for w in pool.workers})
    await publish(new)
    return confirmed
