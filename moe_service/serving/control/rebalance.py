"""The rebalance protocol: load new replicas next to the old ones, publish the new table, wait until
every gateway routes with it, then drop the replicas that moved away. No call ever finds a replica
gone that its table names (a gateway switches tables between steps, and confirms only then)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from moe_service.placement import Placement, plan
from moe_service.placement.timeaware import busiest_seconds
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
                          settings: ProtocolSettings, standbys_of: Callable[[Placement, int], Pairs] | None = None) -> bool:
    """Moves the service to `new` (its worker count may differ); True if every gateway confirmed the new
    table before the old replicas went. `publish` installs the placement and returns the table version;
    `standbys_of` says which of a worker's pairs are standbys."""
    spare = standbys_of or (lambda p, w: [])
    # 1. new workers start with their replicas; existing ones load what they gain, keeping what they lose.
    # Meanwhile a pair is a standby only if it is one in both placements: either table may route to it.
    for w in range(new.num_workers):
        if w not in pool.workers:
            await pool.start(w, pairs_of(new, w), standbys=spare(new, w))
    both, standbys = {}, {}
    for w, worker in pool.workers.items():
        pairs, serving = set(pairs_of(new, w)) if w < new.num_workers else set(), set(worker.pairs) - set(worker.standbys)
        parked = set(spare(new, w)) if w < new.num_workers else set()
        serving |= pairs - parked
        both[w] = sorted(set(worker.pairs) | pairs)
        standbys[w] = sorted(set(both[w]) - serving)
    await pool.load(both, standbys)
    # 2. gateways switch between steps, and say so
    version = await publish(new)
    confirmed = await gateways.wait_confirmed(version, settings)
    # 3. what moved away goes; workers beyond the new count stop
    for w in [w for w in pool.workers if w >= new.num_workers]:
        await pool.remove(w)
    await pool.load({w: pairs_of(new, w) for w in pool.workers}, {w: spare(new, w) for w in pool.workers})
    await publish(new)
    return confirmed


def propose(load: np.ndarray, current: Placement, num_workers: int, replicas_per_worker: int, objective: str,
            by_time: tuple | None = None, min_replicas: int = 1) -> dict:
    """The placement a load window `[L, E]` asks for on `num_workers`, and its expected quality (`gain`, by
    the objective: balancedness, or with `by_time` = (worker_seconds, pairs per step) the predicted expert
    stage). An empty window says nothing: no gain (a forced rebalance or a new worker count still applies)."""
    busy = load.sum() > 0
    time_args = {} if by_time is None else dict(objective="time", worker_seconds=by_time[0], pairs_per_step=by_time[1])
    new = plan(load if busy else np.ones_like(load), num_workers, replicas_per_worker, current=current,
               min_replicas=min_replicas, **time_args)
    before = current.balancedness(load) if busy else np.ones(load.shape[0])
    after = new.balancedness(load) if busy else np.ones(load.shape[0])
    out = {"objective": objective, "balancedness_before": before.tolist(), "balancedness_after": after.tolist(),
           "gain": float(np.mean(after) - np.mean(before))}
    if by_time is not None and busy:
        t0, t1 = (float(busiest_seconds(load, p, by_time[0], by_time[1]).mean()) for p in (current, new))
        out.update(predicted_expert_stage_s_before=t0, predicted_expert_stage_s_after=t1, gain=t0 / t1 - 1)
    return {"placement": new.to_dict(), **out,
            "moves": new.moves_from(current) if new.num_workers == current.num_workers else None,
            "workers": num_workers, "load_tokens": float(load.sum())}


def load_view(load: np.ndarray, p: Placement | None, moe_layers: list[int], pairs: dict[int, Pairs]) -> dict:
    """What operators read of a load window `[L, E]` on a placement: per-worker load, balancedness, the
    hottest experts, and each worker's (layer, expert) pairs."""
    out: dict = {"load_tokens": float(load.sum())}
    if p is None:
        return out
    out["worker_load"] = p.worker_load(load).sum(axis=0).tolist()  # [L, W] summed over layers
    out["balancedness"] = dict(zip(map(str, moe_layers), p.balancedness(load).tolist()))
    order = np.argsort(load, axis=None)[::-1][:10]
    E = load.shape[1]
    out["hottest"] = [{"layer": moe_layers[int(i) // E], "expert": int(i) % E, "tokens": float(load.flat[i]),
                       "replicas": len(p.replicas(int(i) // E, int(i) % E))} for i in order if load.flat[i] > 0]
    out["placement"] = {str(w): [list(x) for x in ps] for w, ps in pairs.items()}
    return out
