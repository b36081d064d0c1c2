"""Time-aware placement: per layer, minimise the predicted time of the slowest worker for an expected batch.

Token balance (planner.py) evens out routed pairs. At small batch a worker's time is mostly the weights of
the experts it touches: replicating a hot expert halves its pairs on each replica but reads its weights
twice. Here a worker's time comes from a cost function of (expected touched replicas, expected pairs,
expected replicas with two or more pairs), the roofline of moe_service.capacity.costmodel in practice, and an expert
is replicated only where that lowers the layer's maximum. Pairs per replica and step are Poisson."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .placement import Placement, as_load, check_sizes

# (expected touched replicas, expected pairs, expected replicas with 2+ pairs) -> seconds
WorkerSeconds = Callable[[float, float, float], float]


def plan_by_time(load, num_workers: int, replicas_per_worker: int, worker_seconds: WorkerSeconds,
                 pairs_per_step: float, starts: tuple[Placement, ...] = ()) -> Placement:
    """Placement of ``load`` ``[L, E]`` minimising each layer's predicted busiest worker when a step routes
    ``pairs_per_step`` (token, expert) pairs per layer (a batch of B tokens routes B x top-k). Each layer's
    search starts from the best of a greedy layout and ``starts`` (plan() passes token balance's, so the
    result is never predicted slower than it)."""
    lams = layer_pairs(load, pairs_per_step)
    num_layers, num_experts = lams.shape
    check_sizes(num_layers, num_experts, num_workers, replicas_per_worker)
    hosts = np.zeros((num_layers, num_experts, num_workers), dtype=bool)
    fractions = np.zeros(hosts.shape)
    for layer, lam in enumerate(lams):
        fractions[layer] = _layer(lam, num_workers, replicas_per_worker, worker_seconds,
                                  [p.fractions[layer] for p in starts])
        hosts[layer] = fractions[layer] > 0
    return Placement(hosts=hosts, fractions=fractions, replicas_per_worker=replicas_per_worker)


def layer_pairs(load, pairs_per_step: float) -> np.ndarray:
    """The pairs ``[L, E]`` each expert expects in a step routing ``pairs_per_step`` pairs per layer the way
    ``load`` ``[L, E]`` did (a layer that saw nothing: uniform)."""
    arr = as_load(load)
    arr = np.where(arr.sum(axis=1, keepdims=True) > 0, arr, 1.0)
    return arr / arr.sum(axis=1, keepdims=True) * pairs_per_step


def busiest_seconds(load, placement: Placement, worker_seconds: WorkerSeconds, pairs_per_step: float) -> np.ndarray:
    """Each layer's predicted busiest worker ``[L]`` under ``placement``, for steps as in ``layer_pairs``."""
    return np.array([predicted_seconds(lam, placement.fractions[layer], worker_seconds).max()
                     for layer, lam in enumerate(layer_pairs(load, pairs_per_step))])


def predicted_seconds(lam: np.ndarray, fractions: np.ndarray, worker_seconds: WorkerSeconds) -> np.ndarray:
    """Each worker's predicted time [W] for a layer whose experts expect ``lam`` [E] pairs, split as
    ``fractions`` [E, W]."""
    return np.array([_worker_time(lam, fractions[:, w], worker_seconds) for w in range(fractions.shape[1])])


def floor_seconds(lam: np.ndarray, num_workers: int, worker_seconds: WorkerSeconds) -> float:
    """A lower bound on the busiest worker of any placement of a layer whose experts expect ``lam`` [E] pairs:
    every expert read once (one replica each), the work spread perfectly. It bounds every placement where a
    replica's cost is concave in its pairs, so splitting an expert never does less work in total: true for
    the roofline's read term (touched with probability 1 - e^-m), and with the multi-row term while reading
    2+ rows costs at most twice one row (this CPU: 1.4x)."""
    none, one = np.exp(-lam), lam * np.exp(-lam)
    return worker_seconds(float((1.0 - none).sum()) / num_workers, float(lam.sum()) / num_workers,
                          float((1.0 - none - one).sum()) / num_workers)


def _worker_time(lam: np.ndarray, col: np.ndarray, cost: WorkerSeconds) -> float:
    """A worker's predicted time when it serves share ``col`` [E] of each expert's ``lam`` pairs: pairs per
    replica are Poisson, so a replica is touched with probability 1 - e^-m and has 2+ pairs with
    1 - e^-m - m e^-m."""
    m = lam * col
    hosted = col > 0
    none, one = np.exp(-m), m * np.exp(-m)
    return cost(float(np.where(hosted, 1.0 - none, 0.0).sum()), float(m.sum()),
                float(np.where(hosted, 1.0 - none - one, 0.0).sum()))


def _layer(lam: np.ndarray, W: int, spw: int, cost: WorkerSeconds, starts: list[np.ndarray],
           tries: int = 4) -> np.ndarray:
    E = len(lam)
    frac = np.zeros((E, W))
    times = np.array([cost(0.0, 0.0, 0.0)] * W)
    # every expert once, hottest first, on the worker it leaves fastest (longest processing time first)
    for e in np.argsort(-lam, kind="stable"):
        best, best_t = -1, np.inf
        for w in range(W):
            if (frac[:, w] > 0).sum() >= spw:
                continue
            frac[e, w] = 1.0
            t = _worker_time(lam, frac[:, w], cost)
            frac[e, w] = 0.0
            if t < best_t - 1e-15:
                best, best_t = w, t
        frac[e, best], times[best] = 1.0, best_t
    for start in starts:
        t = predicted_seconds(lam, start, cost)
        if t.max() < times.max():
            frac, times = start.copy(), t
    # then single edits on the busiest worker while they lower the maximum: move one of its `tries` hottest
    # experts elsewhere, or give it a replica elsewhere (its tokens split evenly over its replicas)
    for _ in range(4 * E * W):
        worst = int(times.argmax())
        best = None
        best_t = times[worst]
        mine = [e for e in np.argsort(-lam, kind="stable") if frac[e, worst] > 0][:tries]
        for e in mine:
            for v in range(W):
                if frac[e, v] > 0 or (frac[:, v] > 0).sum() >= spw:
                    continue
                for edit in ("move", "replicate"):
                    row = frac[e].copy()
                    if edit == "move":
                        row[v], row[worst] = row[worst], 0.0
                    else:
                        row[v] = 1.0
                        row = (row > 0) / (row > 0).sum()
                    changed = {w for w in range(W) if row[w] != frac[e, w]}
                    trial = {}
                    for w in changed:
                        col = frac[:, w].copy()
                        col[e] = row[w]
                        trial[w] = _worker_time(lam, col, cost)
                    others = max([times[w] for w in range(W) if w not in changed and w != worst] + [0.0])
                    t = max(others, *trial.values(), *([] if worst in changed else [times[worst]]))
                    if t < best_t * (1 - 1e-9):
                        best, best_t = (e, row, trial), t
        if best is None:
            break
        e, row, trial = best
        frac[e] = row
        for w, t in trial.items():
            times[w] = t
    return frac
