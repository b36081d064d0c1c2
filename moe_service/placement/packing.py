"""Assigning replicas to workers (longest processing time first)."""

from __future__ import annotations

import heapq

import numpy as np


def pack_replicas(
    load: np.ndarray, counts: np.ndarray, num_workers: int, slots_per_worker: int
) -> np.ndarray:
    """Hosts ``[L, E, W]`` bool placing ``counts`` ``[L, E]`` replicas per expert.

    Replicas are taken in descending order of their equal-split load
    ``load / counts`` and each goes to the least-loaded worker that has a free
    slot and does not host that expert yet (ties: the emptier worker, so slots
    do not run out on a few workers). A replica that finds no such worker
    (possible only for a 2nd+ replica at the very end) is dropped, so every
    expert keeps at least one.
    """
    num_layers, num_experts = load.shape
    hosts = np.zeros((num_layers, num_experts, num_workers), dtype=bool)
    per_replica = load / counts
    for layer in range(num_layers):
        # Heaviest replicas first; an expert's replicas stay back to back.
        order = np.argsort(-per_replica[layer], kind="stable").tolist()
        heap = [(0.0, 0, w) for w in range(num_workers)]  # (load, used slots, worker)
        for expert in order:
            share = float(per_replica[layer, expert])
            for _ in range(int(counts[layer, expert])):
                skipped = []
                while heap:
                    entry = heapq.heappop(heap)
                    if hosts[layer, expert, entry[2]]:
                        skipped.append(entry)
                        continue
                    worker_load, used, worker = entry
                    hosts[layer, expert, worker] = True
                    if used + 1 < slots_per_worker:
                        heapq.heappush(heap, (worker_load + share, used + 1, worker))
                    break
                for entry in skipped:
                    heapq.heappush(heap, entry)
    return hosts
