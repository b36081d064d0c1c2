"""``plan()``: choose a placement for a load, optionally starting from the current one.

With hosts fixed, the token split minimising a layer's busiest worker is the LP

    min t   s.t.   sum_w x[e, w] = load[e],   sum_e x[e, w] <= t,   x >= 0

over the hosted pairs (e, w). A small second term charges each worker's load
above the target cap (mean / target): min-max splits are often degenerate, and
this one leaves as few workers at the cap as it can, so a replica edit that
relieves one of several equally tight groups of workers shows as progress.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment, linprog

from .placement import Placement, as_load, check_sizes
from .redundancy import actives, check_redundancy, standby_slots, with_standbys
from .timeaware import WorkerSeconds, plan_by_time

DEFAULT_MIN_BALANCEDNESS = 0.97
_OVER_WEIGHT = 0.1  # of the summed load above the cap, relative to the peak: small, so the peak comes first
_TRIES = 3  # experts per step, and workers per expert, the local search tries


def plan(
    load: Any, num_workers: int, replicas_per_worker: int, current: Placement | None = None, *,
    min_balancedness: float = DEFAULT_MIN_BALANCEDNESS, objective: str = "tokens",
    worker_seconds: WorkerSeconds | None = None, pairs_per_step: float | None = None, min_replicas: int = 1,
) -> Placement:
    """Placement of ``load`` ``[L, E]`` (token counts) on ``num_workers`` workers.

    Every expert gets a replica, an expert's replicas sit on distinct workers,
    no worker holds more than ``replicas_per_worker`` replicas in a layer, and the
    token split over replicas (``Placement.share``) minimises each layer's
    busiest worker. Layers are planned independently, all-zero ones as uniform.
    On Zipf-skewed loads with >= 25% spare slots and >= 5 slots per worker every
    layer reaches ``min_balancedness`` 0.97 (the tests check this on many loads);
    with fewer it is best effort (1 slot per worker leaves no room to split).

    With ``current``, a layer whose replicas still reach ``min_balancedness``
    once re-split keeps them; otherwise local search adds a few replicas, and a
    fresh layout (relabelled to overlap the current one) is the last resort.
    ``current`` may have another slot or worker count (removed workers are the
    highest ids; their replicas move).

    ``objective="time"`` instead minimises each layer's predicted slowest worker
    (placement/timeaware.py) for steps routing ``pairs_per_step`` pairs, with
    ``worker_seconds(touched replicas, pairs, replicas with 2+ pairs)`` from the cost model; it is never
    predicted slower than token balance's plan or ``current``.

    ``min_replicas`` > 1: every expert on at least that many distinct workers, whatever the objective: the
    active replicas are planned in the slots left after ``standby_slots``, then standbys fill them
    (placement/redundancy.py).
    """
    if min_replicas > 1:
        num_experts = as_load(load).shape[1]
        check_redundancy(num_experts, num_workers, replicas_per_worker, min_replicas)
        active = plan(load, num_workers, replicas_per_worker - standby_slots(num_experts, num_workers, min_replicas),
                      current and actives(current), min_balancedness=min_balancedness, objective=objective, worker_seconds=worker_seconds,
                      pairs_per_step=pairs_per_step)
        return with_standbys(active, min_replicas, replicas_per_worker, prefer=current)
    if objective == "time":
        if worker_seconds is None or pairs_per_step is None:
            raise ValueError("objective='time' needs worker_seconds and pairs_per_step")
        tokens = plan(load, num_workers, replicas_per_worker, current, min_balancedness=min_balancedness)
        # starting from the current placement too: a re-plan is never predicted slower than what runs now
        same = (current is not None and current.num_workers == num_workers
                and current.replicas_per_worker <= replicas_per_worker)
        return plan_by_time(load, num_workers, replicas_per_worker, worker_seconds, pairs_per_step,
                            (tokens, current) if same else (tokens,))
    if objective != "tokens":
        raise ValueError(f"objective must be 'tokens' or 'time', got {objective!r}")
    arr = as_load(load)
    num_layers, num_experts = arr.shape
    check_sizes(num_layers, num_experts, num_workers, replicas_per_worker)
    if not 0.0 < min_balancedness <= 1.0:
        raise ValueError(f"min_balancedness must be in (0, 1], got {min_balancedness}")
    if current is not None and (current.num_layers, current.num_experts) != arr.shape:
        raise ValueError(f"current placement is {current.num_layers} layers x {current.num_experts} experts "
                         f"but load is {num_layers} x {num_experts}")
    hosts = np.zeros((num_layers, num_experts, num_workers), dtype=bool)
    fractions = np.zeros(hosts.shape)
    # A layer that saw no tokens gives no signal: plan it as if every expert were equally hot.
    for layer, row in enumerate(np.where(arr.sum(axis=1, keepdims=True) > 0, arr, 1.0)):
        if current is None:
            hosts[layer], split = _fresh(row, num_workers, replicas_per_worker, min_balancedness)
        else:
            old = (current.hosts[layer], current.fractions[layer])
            hosts[layer], split = _replan(row, *old, num_workers, replicas_per_worker, min_balancedness)
        fractions[layer] = split.fractions
    return Placement(hosts=hosts, fractions=fractions, replicas_per_worker=replicas_per_worker)


def _fresh(row: np.ndarray, num_workers: int, replicas_per_worker: int, target: float) -> tuple[np.ndarray, Split]:
    """One layer from scratch: EPLB replica counts, packed longest first, then local search."""
    num_experts = row.size
    counts = np.ones(num_experts, dtype=np.int64)
    # Each spare slot goes to the expert with the most tokens per replica (EPLB), ties to the lowest id.
    for _ in range(min(num_workers * replicas_per_worker, num_experts * num_workers) - num_experts):
        counts[np.argmax(np.where(counts < num_workers, row / counts, -np.inf))] += 1
    # Replicas heaviest first, an expert's onto the lightest distinct workers with a free slot.
    # A replica that finds none is dropped; every expert keeps one, as replicas fill the slots.
    hosts = np.zeros((num_experts, num_workers), dtype=bool)
    heap = [(0.0, 0, w) for w in range(num_workers)]  # (tokens, used slots, worker)
    per_replica = row / counts
    for expert in np.argsort(-per_replica, kind="stable").tolist():
        taken = [heapq.heappop(heap) for _ in range(min(counts[expert], len(heap)))]
        for tokens, used, worker in taken:
            hosts[expert, worker] = True
            if used + 1 < replicas_per_worker:
                heapq.heappush(heap, (tokens + per_replica[expert], used + 1, worker))
    return _improve(row, hosts, replicas_per_worker, target, budget=num_workers * replicas_per_worker)


def _replan(
    row: np.ndarray, old_hosts: np.ndarray, old_fractions: np.ndarray, num_workers: int, replicas_per_worker: int,
    target: float,
) -> tuple[np.ndarray, Split]:
    """One layer close to its current ``[E, W']`` hosts and fractions (few new replicas)."""
    pad = ((0, 0), (0, max(0, num_workers - old_hosts.shape[1])))  # removed workers are the highest ids
    before = np.pad(old_hosts[:, :num_workers], pad)
    hosts = _repair(row, before.copy(), np.pad(old_fractions[:, :num_workers], pad), replicas_per_worker)
    # Allow about 10% of the layer's slots in new replicas, but enough to fill an added worker.
    budget = max(replicas_per_worker, math.ceil(0.1 * num_workers * replicas_per_worker))
    hosts, split = _improve(row, hosts, replicas_per_worker, target, budget)
    if split.balancedness >= target:
        return hosts, split
    new_hosts, new = _fresh(row, num_workers, replicas_per_worker, target)
    # Re-shuffling most of the layer is only worth it for the target or a clear gain.
    if new.balancedness < target and new.balancedness <= split.balancedness + 0.01:
        return hosts, split
    # Workers are interchangeable: relabel the new layout to keep most replicas in place.
    overlap = before.T.astype(np.int64) @ new_hosts.astype(np.int64)  # [old worker, new worker]
    _, perm = linear_sum_assignment(overlap, maximize=True)
    return new_hosts[:, perm], new._replace(fractions=new.fractions[:, perm], worker_load=new.worker_load[perm])


def _repair(row: np.ndarray, hosts: np.ndarray, fractions: np.ndarray, replicas_per_worker: int) -> np.ndarray:
    """``hosts`` ``[E, W]``, edited in place to fit the slots with every expert hosted.

    Over-full workers drop the replicas that served the fewest tokens, those of
    replicated experts first; experts left without one, heaviest first, go to
    the least-loaded worker with a free slot.
    """
    tokens = row[:, None] * np.where(hosts, fractions, 0.0)  # [E, W]
    for worker in np.flatnonzero(hosts.sum(axis=0) > replicas_per_worker):
        while hosts[:, worker].sum() > replicas_per_worker:
            here = np.flatnonzero(hosts[:, worker])
            single = hosts[here].sum(axis=1) < 2
            hosts[here[np.lexsort((tokens[here, worker], single))[0]], worker] = False
    for expert in np.argsort(-row, kind="stable"):
        if hosts[expert].any():
            continue
        if (hosts.sum(axis=0) >= replicas_per_worker).all():
            # Every slot is taken yet an expert is missing, so some expert has a spare replica.
            spare = hosts & (hosts.sum(axis=1) >= 2)[:, None]
            hosts[np.unravel_index(np.argmin(np.where(spare, tokens, np.inf)), hosts.shape)] = False
        free = hosts.sum(axis=0) < replicas_per_worker
        worker = np.argmin(np.where(free, (tokens * hosts).sum(axis=0), np.inf))
        hosts[expert, worker] = True
        tokens[expert, worker] = row[expert]
    return hosts


class Split(NamedTuple):
    """An LP solution for one layer; loads are in units of the mean worker load."""

    fractions: np.ndarray  # [E, W]
    objective: float
    price: np.ndarray  # [E] how much the objective rises per unit of an expert's load
    worker_load: np.ndarray  # [W]

    @property
    def balancedness(self) -> float:
        return float(self.worker_load.mean() / self.worker_load.max())


def _solve(load_row: np.ndarray, hosts: np.ndarray, target: float) -> Split:
    """Min-max split of ``load_row`` ``[E]`` (positive sum) over ``hosts`` ``[E, W]`` (every expert hosted)."""
    num_experts, num_workers = hosts.shape
    expert, worker = np.nonzero(hosts)  # one variable per replica
    n, ids = expert.size, np.arange(num_workers)
    # Columns: tokens per replica [n], the peak t, each worker's load above the cap [W].
    rows = np.concatenate([worker, num_workers + worker, ids, num_workers + ids])
    cols = np.concatenate([np.arange(n), np.arange(n), np.full(num_workers, n), n + 1 + ids])
    values = np.concatenate([np.ones(2 * n), -np.ones(2 * num_workers)])
    width = n + 1 + num_workers
    a_ub = sp.csr_matrix((values, (rows, cols)), shape=(2 * num_workers, width))
    b_ub = np.concatenate([np.zeros(num_workers), np.full(num_workers, 1.0 / target)])
    a_eq = sp.csr_matrix((np.ones(n), (expert, np.arange(n))), shape=(num_experts, width))
    cost = np.concatenate([np.zeros(n), [1.0], np.full(num_workers, _OVER_WEIGHT / num_workers)])
    # Scaled so the mean worker load is 1, which keeps the solver's tolerances meaningful.
    b_eq = load_row * (num_workers / load_row.sum())
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, method="highs")
    if res.status != 0:
        raise RuntimeError(f"split LP failed: {res.message}")
    tokens = np.zeros(hosts.shape)
    tokens[expert, worker] = np.clip(res.x[:n], 0.0, None)
    total = tokens.sum(axis=1, keepdims=True)
    # An expert without tokens keeps an equal split; the choice is immaterial.
    fractions = np.where(total > 0, tokens / np.where(total > 0, total, 1.0), hosts / hosts.sum(1, keepdims=True))
    return Split(fractions, float(res.fun), res.eqlin.marginals, tokens.sum(axis=0))


def _improve(
    load_row: np.ndarray, hosts: np.ndarray, replicas_per_worker: int, target: float, budget: int
) -> tuple[np.ndarray, Split]:
    """Hosts ``[E, W]`` and their split after adding at most ``budget`` replicas to ``hosts``.

    Each step takes the first of :func:`_edits` that lowers the LP objective;
    it stops at ``target`` balancedness, at the budget or when no edit helps.
    """
    best = _solve(load_row, hosts, target)
    for _ in range(budget):
        if best.balancedness >= target:
            break
        for cand in _edits(load_row, hosts, best, replicas_per_worker):
            split = _solve(load_row, cand, target)
            if split.objective < best.objective - 1e-9:
                hosts, best = cand, split
                break
        else:
            break
    return hosts, best


def _edits(load_row: np.ndarray, hosts: np.ndarray, split: Split, replicas_per_worker: int) -> Iterator[np.ndarray]:
    """Candidate hosts ``[E, W]``, each with one replica added, most promising first.

    The replica is for one of the experts the LP prices highest (those confining
    load to the tightest workers), on a worker not at the peak, preferring one
    with a free slot; otherwise that worker drops the replica of another
    replicated expert that serves the fewest tokens.
    """
    counts, used = hosts.sum(axis=1), hosts.sum(axis=0)  # [E], [W]
    tokens = load_row[:, None] * split.fractions
    spare = hosts & (counts >= 2)[:, None]
    # Tokens lost by freeing a slot on each worker (-1: a slot is free already).
    free_cost = np.where(used < replicas_per_worker, -1.0, np.where(spare, tokens, np.inf).min(axis=0))
    at_peak = split.worker_load >= split.worker_load.max() * (1 - 1e-9)
    for expert in np.argsort(-load_row * split.price, kind="stable")[:_TRIES]:
        if load_row[expert] * split.price[expert] <= 1e-12:
            return
        key = np.where(hosts[expert] | at_peak, np.inf, free_cost)
        for worker in np.lexsort((split.worker_load, key))[:_TRIES]:  # cheapest slot, then lightest worker
            if not np.isfinite(key[worker]):
                break
            cand = hosts.copy()
            cand[expert, worker] = True
            if used[worker] >= replicas_per_worker:
                cand[np.argmin(np.where(spare[:, worker], tokens[:, worker], np.inf)), worker] = False
            yield cand
