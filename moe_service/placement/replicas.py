"""How many replicas each expert gets (EPLB-style greedy)."""

from __future__ import annotations

import numpy as np


def replica_counts(load: np.ndarray, num_workers: int, total_slots: int) -> np.ndarray:
    """Replicas per expert, ``[L, E]`` int, for ``load`` ``[L, E]``.

    Every expert starts with one replica; each spare slot then goes to the
    expert with the highest load per replica (DeepSeek EPLB), never giving one
    expert more than ``num_workers`` replicas (replicas of an expert must sit on
    distinct workers). Every layer gets ``min(total_slots, E * num_workers)``
    replicas. Assumes ``total_slots >= E``.
    """
    num_layers, num_experts = load.shape
    counts = np.ones((num_layers, num_experts), dtype=np.int64)
    spare = min(total_slots, num_experts * num_workers) - num_experts
    rows = np.arange(num_layers)
    # Ties (e.g. equal loads) go to the lowest expert id, which keeps plans
    # deterministic for a given input.
    for _ in range(spare):
        per_replica = np.where(counts < num_workers, load / counts, -np.inf)
        counts[rows, np.argmax(per_replica, axis=1)] += 1
    return counts
