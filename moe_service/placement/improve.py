"""Local search: small replica edits that relieve the busiest worker.

Each step, for every layer still under its balancedness target, builds a few
candidate edits around the busiest worker: give one of its heaviest experts a
replica on a lightly loaded worker (freeing a slot there by dropping a
redundant replica, or by moving a single-replica expert to a worker with a free
slot), or move one of its single-replica experts to a lightly loaded worker
with a free slot. It re-optimises the splits of every candidate in one batch
and keeps the one with the lowest peak, if that beats the current peak. Each
edit adds one or two replicas, and the number added is capped by a budget, so
the search bounds weight transfers.
"""

from __future__ import annotations

import numpy as np

from .splits import optimal_fractions

_EXPERTS = 2  # heaviest experts of the busiest worker tried per step
_TARGETS = 2  # light workers tried per expert

Edit = tuple[list[tuple[int, int, bool]], int]  # ((expert, worker, hosted?) changes, replicas added)


def improve(
    load: np.ndarray,
    hosts: np.ndarray,
    fractions: np.ndarray,
    slots_per_worker: int,
    target: float,
    budget: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Improved ``(hosts, fractions)``, ``[L, E, W]`` each, for ``load`` ``[L, E]``.

    Per layer, stops when balancedness reaches ``target``, when no candidate
    lowers the peak, or when the next edit would add more than ``budget``
    replicas in total.
    """
    hosts = hosts.copy()
    fractions = fractions.copy()
    spent = np.zeros(load.shape[0], dtype=np.int64)
    active = list(range(load.shape[0]))
    while active:
        per_worker = np.einsum("le,lew->lw", load[active], fractions[active])
        peak = per_worker.max(axis=1)
        under = per_worker.mean(axis=1) < target * peak
        cand_hosts: list[np.ndarray] = []
        owner: list[int] = []
        cost: list[int] = []
        peaks = {}
        for layer, loads, pk, bad in zip(active, per_worker, peak, under):
            if not bad:
                continue
            peaks[layer] = pk
            for changes, added in _edits(load[layer], hosts[layer], fractions[layer], loads, slots_per_worker):
                if spent[layer] + added > budget:
                    continue
                cand = hosts[layer].copy()
                for expert, worker, on in changes:
                    cand[expert, worker] = on
                cand_hosts.append(cand)
                owner.append(layer)
                cost.append(added)
        if not cand_hosts:
            break
        owners = np.asarray(owner)
        # Candidates only need ranking, so a short warm-started descent will do.
        cand_frac = optimal_fractions(
            load[owners], np.stack(cand_hosts), init=fractions[owners], max_sweeps=25, tol=1e-5
        )
        cand_peak = np.einsum("le,lew->lw", load[owners], cand_frac).max(axis=1)
        active = []
        for layer in peaks:
            mine = np.flatnonzero(owners == layer)
            if mine.size == 0:
                continue
            best = mine[np.argmin(cand_peak[mine])]
            if cand_peak[best] < peaks[layer] * (1.0 - 1e-9):
                hosts[layer] = cand_hosts[best]
                fractions[layer] = cand_frac[best]
                spent[layer] += cost[best]
                active.append(layer)
    # Accepted candidates were only refined briefly; finish the descent.
    return hosts, optimal_fractions(load, hosts, init=fractions)


def _edits(
    load_row: np.ndarray,
    hosts: np.ndarray,
    fractions: np.ndarray,
    worker_load: np.ndarray,
    slots_per_worker: int,
) -> list[Edit]:
    """Candidate edits of one layer's ``[E, W]`` hosts around its busiest worker."""
    num_workers = hosts.shape[1]
    busiest = int(np.argmax(worker_load))
    counts = hosts.sum(axis=1)  # [E]
    free = hosts.sum(axis=0) < slots_per_worker  # [W]
    by_load = [int(w) for w in np.argsort(worker_load, kind="stable") if w != busiest]
    free_by_load = [w for w in by_load if free[w]]
    on_busiest = np.flatnonzero(hosts[:, busiest] & (counts < num_workers))
    tokens_there = load_row[on_busiest] * fractions[on_busiest, busiest]
    experts = on_busiest[np.argsort(-tokens_there, kind="stable")][:_EXPERTS]
    edits: list[Edit] = []
    for expert in experts.tolist():
        found = 0
        for worker in by_load:
            if found == _TARGETS:
                break
            if hosts[expert, worker]:
                continue
            add = (expert, worker, True)
            if free[worker]:
                edits.append(([add], 1))
                if counts[expert] == 1:
                    # Or move it outright, which also frees a slot here.
                    edits.append(([add, (expert, busiest, False)], 1))
                found += 1
                continue
            here = np.flatnonzero(hosts[:, worker])
            spare = here[(counts[here] >= 2) & (here != expert)]
            if spare.size:
                # Drop the redundant replica serving the fewest tokens here.
                drop = int(spare[np.argmin(load_row[spare] * fractions[spare, worker])])
                edits.append(([(drop, worker, False), add], 1))
            lone = here[counts[here] == 1]
            homes = [w for w in free_by_load if w != worker]
            if lone.size and homes:
                # Or move the lightest single-replica expert here to the
                # lightest worker with a free slot, then add.
                moved = int(lone[np.argmin(load_row[lone])])
                edits.append(([(moved, worker, False), (moved, homes[0], True), add], 2))
            found += bool(spare.size or (lone.size and homes))
    return edits
