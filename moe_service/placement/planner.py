"""``plan()``: choose a placement for a load, optionally starting from the current one."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .chain import chain_hosts
from .improve import improve
from .loads import as_load, effective_load
from .matching import align_workers
from .packing import pack_replicas
from .placement import Placement, check_sizes
from .replicas import replica_counts
from .splits import optimal_fractions

DEFAULT_MIN_BALANCEDNESS = 0.97
# Split refinement stops once every layer is this balanced: closer to perfect
# changes nothing a gateway would notice.
_GOOD_ENOUGH = 0.999


def plan(
    load: Any,
    num_workers: int,
    slots_per_worker: int,
    current: Placement | None = None,
    *,
    min_balancedness: float = DEFAULT_MIN_BALANCEDNESS,
) -> Placement:
    """Placement of ``load`` ``[L, E]`` (token counts) on ``num_workers`` workers.

    Every expert gets at least one replica, replicas of an expert sit on
    distinct workers and no worker holds more than ``slots_per_worker``
    replicas in a layer. Hot experts get extra replicas and the token split
    over replicas (``Placement.share``) is chosen to minimise each layer's
    busiest worker. Layers whose load is all zero are planned as uniform.
    Layers still under ``min_balancedness`` after construction get local
    search. On Zipf-skewed loads with >= 25% spare slots and >= 5 slots per
    worker every layer reaches 0.97 (the tests check this on many loads); with
    fewer slots per worker that is not always possible (1 slot per worker
    leaves no room to split a hot expert), and the result is best effort.

    With ``current``, layers whose current replicas still reach
    ``min_balancedness`` once the splits are re-optimised keep them unchanged;
    other layers add as few replicas as local search needs, and only fall back
    to a fresh layout (relabelled to overlap the current one) when that fails.
    ``current`` may have a different worker count (removed workers are the
    highest ids; their replicas move) or slot count.
    """
    arr = as_load(load)
    num_layers, num_experts = arr.shape
    check_sizes(num_layers, num_experts, num_workers, slots_per_worker)
    if not 0.0 < min_balancedness <= 1.0:
        raise ValueError(f"min_balancedness must be in (0, 1], got {min_balancedness}")
    eff = effective_load(arr)
    if current is None:
        hosts, fractions = fresh_layout(eff, num_workers, slots_per_worker, min_balancedness)
    else:
        if (current.num_layers, current.num_experts) != (num_layers, num_experts):
            raise ValueError(
                f"current placement is {current.num_layers} layers x {current.num_experts} "
                f"experts but load is {num_layers} x {num_experts}"
            )
        hosts, fractions = _replan(eff, num_workers, slots_per_worker, current, min_balancedness)
    return Placement(hosts=hosts, fractions=fractions, slots_per_worker=slots_per_worker)


def fresh_layout(
    load: np.ndarray, num_workers: int, slots_per_worker: int, target: float
) -> tuple[np.ndarray, np.ndarray]:
    """Hosts and fractions ``[L, E, W]`` for ``load`` ``[L, E]`` (no zero rows), from scratch.

    Two constructions, each followed by split refinement, and the better one
    per layer: EPLB replica counts packed longest-first (good when slots are
    scarce), and the wrap-around chain (good when one expert needs many
    workers, as the chain keeps every worker connected through split experts).
    Layers still under ``target`` get local search.
    """
    total_slots = num_workers * slots_per_worker
    counts = replica_counts(load, num_workers, total_slots)
    lpt_hosts = pack_replicas(load, counts, num_workers, slots_per_worker)
    lpt_frac = optimal_fractions(load, lpt_hosts, good_enough=_GOOD_ENOUGH)
    chain_h, chain_f = chain_hosts(load, num_workers, slots_per_worker)
    chain_f = optimal_fractions(load, chain_h, init=chain_f, good_enough=_GOOD_ENOUGH)
    # Ties (both perfect, up to rounding) keep the EPLB layout and its replicas.
    use_chain = _balancedness(load, chain_f) > _balancedness(load, lpt_frac) + 1e-9
    hosts = np.where(use_chain[:, None, None], chain_h, lpt_hosts)
    fractions = np.where(use_chain[:, None, None], chain_f, lpt_frac)
    bad = np.flatnonzero(_balancedness(load, fractions) < target)
    if bad.size:
        hosts[bad], fractions[bad] = improve(
            load[bad], hosts[bad], fractions[bad], slots_per_worker, target, total_slots
        )
    return hosts, fractions


def _replan(
    load: np.ndarray, num_workers: int, slots_per_worker: int, current: Placement, target: float
) -> tuple[np.ndarray, np.ndarray]:
    """Hosts and fractions ``[L, E, W]`` close to ``current`` (few new replicas)."""
    before = _resize(current.hosts, num_workers)  # [L, E, W] what workers hold now
    hosts, init = _repair(load, before, _resize(current.fractions, num_workers), slots_per_worker)
    fractions = optimal_fractions(load, hosts, init=init, good_enough=_GOOD_ENOUGH)
    bad = np.flatnonzero(_balancedness(load, fractions) < target)
    if bad.size == 0:
        return hosts, fractions
    # Local search adds a replica or two per edit; allow about 10% of a
    # layer's slots before considering a fresh layout, but at least enough to
    # fill an added worker.
    budget = max(slots_per_worker, math.ceil(0.1 * num_workers * slots_per_worker))
    hosts[bad], fractions[bad] = improve(
        load[bad], hosts[bad], fractions[bad], slots_per_worker, target, budget
    )
    still = bad[_balancedness(load[bad], fractions[bad]) < target]
    if still.size == 0:
        return hosts, fractions
    new_hosts, new_frac = fresh_layout(load[still], num_workers, slots_per_worker, target)
    new_bal = _balancedness(load[still], new_frac)
    old_bal = _balancedness(load[still], fractions[still])
    for i, layer in enumerate(still):
        # Only a layout that reaches the target, or clearly beats the repaired
        # one, is worth re-shuffling most of the layer's replicas.
        if new_bal[i] >= target or new_bal[i] > old_bal[i] + 0.01:
            perm = align_workers(new_hosts[i], before[layer])
            hosts[layer] = new_hosts[i][:, perm]
            fractions[layer] = new_frac[i][:, perm]
    return hosts, fractions


def _resize(arr: np.ndarray, num_workers: int) -> np.ndarray:
    """``[L, E, W']`` -> ``[L, E, num_workers]``: drop the highest workers or add empty ones."""
    out = np.zeros(arr.shape[:2] + (num_workers,), dtype=arr.dtype)
    keep = min(num_workers, arr.shape[2])
    out[:, :, :keep] = arr[:, :, :keep]
    return out


def _repair(
    load: np.ndarray, hosts: np.ndarray, fractions: np.ndarray, slots_per_worker: int
) -> tuple[np.ndarray, np.ndarray]:
    """Make ``hosts`` ``[L, E, W]`` valid for ``slots_per_worker``: trim over-full
    workers, re-home experts left without a replica and seed empty workers.
    Returns hosts and the warm-start fractions (rows no longer summing to 1 get
    reset later)."""
    hosts = hosts.copy()
    over = hosts.sum(axis=1) > slots_per_worker  # [L, W]
    orphan = ~hosts.any(axis=2)  # [L, E]
    empty = ~hosts.any(axis=1)  # [L, W]
    for layer in np.flatnonzero(over.any(axis=1) | orphan.any(axis=1) | empty.any(axis=1)):
        _repair_layer(load[layer], hosts[layer], fractions[layer], slots_per_worker)
    return hosts, np.where(hosts, fractions, 0.0)


def _repair_layer(
    load_row: np.ndarray, hosts: np.ndarray, fractions: np.ndarray, slots_per_worker: int
) -> None:
    """In-place :func:`_repair` of one layer's ``[E, W]`` hosts."""
    served = load_row[:, None] * np.where(hosts, fractions, 0.0)  # [E, W] tokens
    for worker in np.flatnonzero(hosts.sum(axis=0) > slots_per_worker):
        while hosts[:, worker].sum() > slots_per_worker:
            here = np.flatnonzero(hosts[:, worker])
            redundant = here[hosts[here].sum(axis=1) >= 2]
            # Drop redundant replicas first (their experts stay hosted), the
            # least-used first; otherwise evict the lightest expert to re-home.
            pool = redundant if redundant.size else here
            hosts[pool[np.argmin(served[pool, worker])], worker] = False
    counts = hosts.sum(axis=1)
    est = (load_row[:, None] * hosts / np.maximum(counts, 1)[:, None]).sum(axis=0)  # [W]
    for expert in np.argsort(-load_row, kind="stable"):
        if counts[expert]:
            continue
        free = hosts.sum(axis=0) < slots_per_worker
        if not free.any():
            # Every slot is taken yet an expert is missing, so some expert has
            # a spare replica: drop the least-used one on the lightest worker.
            spare = hosts & (counts >= 2)[:, None]
            worker = int(np.argmin(np.where(spare.any(axis=0), est, np.inf)))
            pool = np.flatnonzero(spare[:, worker])
            drop = pool[np.argmin(served[pool, worker])]
            hosts[drop, worker] = False
            counts[drop] -= 1
            free[worker] = True
        worker = int(np.argmin(np.where(free, est, np.inf)))
        hosts[expert, worker] = True
        counts[expert] = 1
        est[worker] += load_row[expert]
    # Seed each empty (e.g. newly added) worker with a replica of the expert
    # with the most tokens per replica, so the split refinement can pour load
    # onto it at once; local search tops it up if that is not enough.
    for worker in np.flatnonzero(~hosts.any(axis=0)):
        expert = int(np.argmax(np.where(counts < hosts.shape[1], load_row / (counts + 1), -np.inf)))
        hosts[expert, worker] = True
        counts[expert] += 1


def _balancedness(load: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Mean / max worker load per layer, ``[L]``, for ``load`` ``[L, E]`` (no zero rows)."""
    per_worker = np.einsum("le,lew->lw", load, fractions)
    return per_worker.mean(axis=1) / per_worker.max(axis=1)
