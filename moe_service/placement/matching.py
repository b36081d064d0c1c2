"""Worker relabelling: line a new layer layout up with the current one.

Workers are interchangeable within a layer, so a freshly planned layer can be
permuted over worker ids to keep as many replicas where they already are.
"""

from __future__ import annotations

import numpy as np


def max_weight_matching(weight: np.ndarray) -> np.ndarray:
    """Permutation ``p`` maximising ``sum(weight[i, p[i]])`` for square ``weight`` ``[n, n]``.

    Hungarian algorithm (shortest augmenting paths with potentials), O(n^3);
    n is a worker count, so this stays cheap.
    """
    n = weight.shape[0]
    cost = (weight.max(initial=0) - weight).astype(np.float64)  # maximise -> minimise
    inf = float("inf")
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[col] = row, 1-based, 0 = free
    way = np.zeros(n + 1, dtype=np.int64)
    for row in range(1, n + 1):
        match[0] = row
        col0 = 0
        minv = np.full(n + 1, inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col0] = True
            row0 = match[col0]
            cols = np.flatnonzero(~used[1:]) + 1
            cur = cost[row0 - 1, cols - 1] - u[row0] - v[cols]
            better = cur < minv[cols]
            minv[cols[better]] = cur[better]
            way[cols[better]] = col0
            col1 = int(cols[np.argmin(minv[cols])])
            delta = minv[col1]
            u[match[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:
            col1 = way[col0]
            match[col0] = match[col1]
            col0 = col1
    perm = np.empty(n, dtype=np.int64)
    perm[match[1:] - 1] = np.arange(n)
    return perm


def align_workers(new_hosts: np.ndarray, old_hosts: np.ndarray) -> np.ndarray:
    """Column permutation of ``new_hosts`` ``[E, W]`` keeping most replicas of ``old_hosts`` ``[E, W]``.

    Returns ``perm`` with ``new_hosts[:, perm]`` the relabelled layout: new worker
    ``perm[w]`` becomes worker ``w``.
    """
    overlap = old_hosts.T.astype(np.int64) @ new_hosts.astype(np.int64)  # [old w, new w']
    return max_weight_matching(overlap)
