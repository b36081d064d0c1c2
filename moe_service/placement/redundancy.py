"""Every expert on at least `min_replicas` distinct workers, so that a lost worker's pairs always have a live
replica elsewhere in the same layer call (no wait for a restart).

The planners place the *active* replicas, those that serve tokens, in `replicas_per_worker - standby_slots`
slots per worker; then `with_standbys` adds a standby (share 0) for each expert on fewer workers than asked,
in the slots kept free for them. A standby serves only when its expert's other replicas are lost
(`LayerRoutes.without` splits an expert's tokens evenly over standbys when nothing else is left). Both
objectives (tokens, time) go through the same step, so both keep the invariant."""

from __future__ import annotations

import math

import numpy as np

from .placement import Placement

# `min_replicas` unset: 2 where the experts with their standbys take at most this share of the memory their
# workers have for experts (free, plus what they hold already); the rest is the compute's working memory
AUTO_MEMORY_SHARE = 0.8


def standby_slots(num_experts: int, num_workers: int, min_replicas: int) -> int:
    """Slots per worker and layer to keep for standbys: room for every expert's `min_replicas - 1` more."""
    return math.ceil(num_experts * (min_replicas - 1) / num_workers) if min_replicas > 1 else 0


def check_redundancy(num_experts: int, num_workers: int, replicas_per_worker: int, min_replicas: int) -> None:
    if min_replicas < 1:
        raise ValueError(f"min_replicas must be >= 1, got {min_replicas}")
    if min_replicas > num_workers:
        raise ValueError(f"min_replicas {min_replicas} needs at least as many workers; there are {num_workers}")
    active = replicas_per_worker - standby_slots(num_experts, num_workers, min_replicas)
    if active * num_workers < num_experts:
        raise ValueError(f"{replicas_per_worker} slots per worker cannot hold every expert {min_replicas} times on "
                         f"{num_workers} workers: at least {math.ceil(num_experts / num_workers) + standby_slots(num_experts, num_workers, min_replicas)} are needed")


def with_standbys(active: Placement, min_replicas: int, replicas_per_worker: int,
                  prefer: Placement | None = None) -> Placement:
    """`active` with a standby replica (share 0) added for each expert hosted on fewer than `min_replicas`
    workers, in `replicas_per_worker` slots. A standby goes where `prefer` (the placement running now) had
    a replica of the expert, so that a re-plan moves few weights; else to the worker with the most free slots."""
    L, E, W = active.hosts.shape
    check_redundancy(E, W, replicas_per_worker, min_replicas)
    hosts = np.zeros((L, E, W), dtype=bool)
    hosts[:] = active.hosts
    before = np.zeros((L, E, W), dtype=bool)
    if prefer is not None and prefer.hosts.shape[:2] == (L, E):
        n = min(W, prefer.num_workers)
        before[:, :, :n] = prefer.hosts[:, :, :n]
    for layer in range(L):
        used = hosts[layer].sum(axis=0)  # [W]
        need = min_replicas - hosts[layer].sum(axis=1)  # [E]
        for expert in np.argsort(-need, kind="stable"):
            for _ in range(int(need[expert])):
                free = (used < replicas_per_worker) & ~hosts[layer, expert]
                if not free.any():
                    raise ValueError(f"no free slot for a standby of expert {expert} in layer {layer} "
                                     f"({replicas_per_worker} slots per worker, {W} workers)")
                # where it was before, then the most free slots, then the lowest id
                key = np.where(free, before[layer, expert] * (replicas_per_worker + 1) + replicas_per_worker - used, -1)
                worker = int(np.argmax(key))
                hosts[layer, expert, worker] = True
                used[worker] += 1
    return Placement(hosts=hosts, fractions=active.fractions, replicas_per_worker=replicas_per_worker)


def actives(p: Placement) -> Placement:
    """`p` without its standbys (hosted replicas with no share of a served expert): what a re-plan starts from,
    so that the planners see the replicas that serve tokens; `with_standbys(prefer=p)` puts the rest back."""
    serving = p.hosts & (p.fractions > 0)
    hosts = np.where(serving.any(axis=2, keepdims=True), serving, p.hosts)
    return Placement(hosts=hosts, fractions=p.fractions, replicas_per_worker=p.replicas_per_worker)


def live_replicas(placement: Placement, healthy: set[int] | list[int]) -> np.ndarray:
    """Replicas of each expert on healthy workers, ``[L, E]``."""
    alive = np.zeros(placement.num_workers, dtype=bool)
    alive[[w for w in healthy if w < placement.num_workers]] = True
    return (placement.hosts & alive).sum(axis=2)


def redundancy_fits(needs: list[tuple[dict | None, int]]) -> tuple[bool, str]:
    """Whether the workers' memory holds their experts with standbys. `needs`: (a memory a worker reported,
    the bytes of experts it would hold there), one per worker and memory (its device; with standbys in host
    memory, its node's too). A report (`transport.memory.device_memory`) names its pool (a node's RAM, one
    GPU), says what is free there and what the worker holds there already (`held_bytes`); the needs in one
    pool add up to at most `AUTO_MEMORY_SHARE` of its free memory plus what they hold. Returns the verdict
    and the tightest pool's numbers."""
    if not needs or any(report is None for report, _ in needs):
        return False, "the workers did not report their memory"
    pools: dict[str, list[tuple[dict, int]]] = {}
    for report, need in needs:
        pools.setdefault(report["pool"], []).append((report, need))
    worst = (-1.0, "", 0, 0)
    for pool, items in pools.items():
        needed = sum(need for _, need in items)
        room = min(r["free_bytes"] for r, _ in items) + sum(r["held_bytes"] for r, _ in items)
        share = needed / room if room > 0 else math.inf
        worst = max(worst, (share, pool, needed, room))
    share, pool, needed, room = worst
    return share <= AUTO_MEMORY_SHARE, (f"{needed / 2**30:.2f} GiB of experts with standbys in {room / 2**30:.2f} GiB "
                                        f"({pool[:16]}): {share:.0%}, at most {AUTO_MEMORY_SHARE:.0%}")
