"""One MoE layer's data path on the gateway: choose a replica for every (token, expert) pair, group the
pairs by worker (each token at most once per worker), and add the workers' partial sums back. Array ops
only: ids and rows never become Python lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

# T tokens, K experts per token, E experts in the layer, R max replicas of one expert, W workers, D hidden

NO_PAIR, NO_REPLICA = -1, -2  # an owner table's answer for padding (id -1), and for an expert with no live replica


class NoReplicaError(RuntimeError):
    """Every replica of an expert is on an excluded (failed) worker."""

    def __init__(self, layer: int, expert: int) -> None:
        super().__init__(f"no live replica of expert {expert} in layer {layer}")
        self.layer, self.expert = layer, expert


@dataclass
class LayerRoutes:
    """For one layer: each expert's replicas (worker ids) and the share of its tokens each takes."""

    layer: int
    replicas: list[list[int]]  # [E][r] worker ids
    shares: list[list[float]] | None = None  # [E][r], each row sums to 1; None = equal split
    _tables: tuple | None = field(default=None, repr=False, compare=False)

    def without(self, excluded: Iterable[int]) -> "LayerRoutes":
        """The same routes with some workers removed; shares renormalised over what is left."""
        ex = set(excluded)
        if not ex:
            return self
        reps, shares = [], []
        for e, workers in enumerate(self.replicas):
            sh = self.shares[e] if self.shares else [1.0] * len(workers)
            kept = [(w, s) for w, s in zip(workers, sh) if w not in ex]
            total = sum(s for _, s in kept)
            reps.append([w for w, _ in kept])
            # the kept replicas' shares, renormalised (all of them zero: an equal split; none kept: none)
            shares.append([s / total for _, s in kept] if total else [1.0 / len(kept)] * len(kept) if kept else [])
        return LayerRoutes(self.layer, reps, shares)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(workers [E + 1, R], cumulative shares [E + 1, R]). Row E stands for id -1 (no pair, NO_PAIR);
        a row without replicas holds NO_REPLICA; a missing replica's share is 2.0, past any pair's place."""
        if self._tables is None:
            E = len(self.replicas)
            R = max(1, max(len(r) for r in self.replicas))
            workers = np.full((E + 1, R), NO_REPLICA, dtype=np.int64)
            workers[E] = NO_PAIR
            cum = np.full((E + 1, R), 2.0)
            for e, reps in enumerate(self.replicas):
                if not reps:
                    continue
                sh = self.shares[e] if self.shares else [1.0 / len(reps)] * len(reps)
                workers[e, : len(reps)] = reps
                workers[e, len(reps):] = reps[-1]
                c = np.cumsum(sh)
                c[-1] = 1.0 + 1e-9  # absorb rounding so the last replica takes the tail
                cum[e, : len(reps)] = c
            self._tables = (workers, cum)
        return self._tables


@dataclass
class WorkerDispatch:
    """What one worker receives for one layer."""

    worker: int
    rows: torch.Tensor  # [n] token indices into the layer's input
    experts: torch.Tensor  # [n, K] int32, -1 where the pair goes to another worker (the wire's form)
    weights: torch.Tensor  # [n, K] float32


# The plan is numpy's, not torch's, and sorts nothing: every torch op and numpy's sorts release the GIL, and
# in a gateway whose event loop and gRPC threads want it too, each release can cost a wait of up to the
# interpreter's switch interval to take it back (docs/performance.md, "One step you can follow"). numpy
# keeps it for small arrays. The arrays are the tensors' own memory: no copies.


def _array(t: torch.Tensor) -> np.ndarray:
    return (t.detach() if t.requires_grad else t).numpy()


def assign_replicas(ids: np.ndarray, routes: LayerRoutes) -> np.ndarray:
    """The worker of every (token, expert) pair: ids [T, K] (-1: no pair) -> owners [T, K] (NO_PAIR where no
    pair, NO_REPLICA where the expert has no live replica).

    A replicated expert's pairs are split across its replicas by share, in token order, so the choice is
    deterministic for a given batch."""
    workers, cum = routes.tables()
    if workers.shape[1] == 1:
        return workers[ids, 0]  # id -1 reads row E: NO_PAIR
    E = workers.shape[0] - 1
    flat = ids.reshape(-1)
    e = np.where(flat < 0, E, flat)
    order = np.argsort(e, kind="stable")  # with replicas only: a sort, and a GIL release
    sorted_e = e[order]
    counts = np.bincount(e, minlength=E + 1)
    starts = np.cumsum(counts) - counts
    rank = np.arange(e.size) - starts[sorted_e]
    place = (rank + 0.5) / counts[sorted_e]  # where each pair sits in its expert's run
    # the first replica whose cumulative share reaches the place
    idx = np.minimum((cum[sorted_e] < place[:, None]).sum(axis=1), workers.shape[1] - 1)
    owner = np.empty(e.size, dtype=workers.dtype)
    owner[order] = workers[sorted_e, idx]
    return owner.reshape(ids.shape)


def plan_dispatch(ids: torch.Tensor, weights: torch.Tensor, routes: LayerRoutes) -> list[WorkerDispatch]:
    """ids [T, K] (-1: no pair), weights [T, K] float32, both on the host -> one WorkerDispatch per worker
    that has work, by worker id, its ids in the wire's int32. A row whose pairs are all -1 goes to no worker."""
    ids_a, weights_a = _array(ids), _array(weights)
    owner = assign_replicas(ids_a, routes)  # [T, K]
    pairs_of = np.bincount(owner.reshape(-1) - NO_REPLICA)  # [2 + workers]: NO_REPLICA, NO_PAIR, worker 0, ...
    if pairs_of[0]:
        raise NoReplicaError(routes.layer, int(ids_a[owner == NO_REPLICA][0]))
    workers = np.flatnonzero(pairs_of[2:])  # the workers with pairs, in id order
    mine = owner == workers[:, None, None]  # [W, T, K]
    has = mine.any(axis=2)  # [W, T]
    which, rows = np.nonzero(has)  # by worker, then row: each worker's rows in order
    sel = mine[which, rows]  # [P, K]
    e = np.where(sel, ids_a[rows], -1).astype(np.int32, copy=False)  # the wire's int32
    w = np.where(sel, weights_a[rows], 0.0).astype(np.float32, copy=False)
    ends = np.cumsum(has.sum(axis=1)).tolist()  # W slice bounds, not ids or rows
    rows_t, e_t, w_t = torch.from_numpy(rows), torch.from_numpy(e), torch.from_numpy(w)
    return [WorkerDispatch(int(worker), rows_t[a:b], e_t[a:b], w_t[a:b])
            for worker, a, b in zip(workers.tolist(), [0, *ends], ends)]


def combine(num_tokens: int, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Add each worker's rows `(rows [n], output [n, D])` into a `[T, D]` tensor of `like`'s dtype (`out`
    if given), in the given order; in float32, cast once, whatever that dtype."""
    D = like.shape[-1]
    acc = out if out is not None and out.dtype == torch.float32 else None
    if acc is None:
        acc = torch.zeros(num_tokens, D, dtype=torch.float32, device=like.device)
    else:
        acc.zero_()
    for rows, y in parts:
        acc.index_add_(0, rows.to(acc.device), y.to(acc.device, torch.float32))
    if out is None:
        return acc.to(like.dtype)
    return acc if acc is out else out.copy_(acc)
