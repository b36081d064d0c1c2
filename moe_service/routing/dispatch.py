"""One MoE layer's data path on the gateway: choose a replica for every (token, expert) pair, group the
pairs by worker (each token at most once per worker), and add the workers' partial sums back. Tensor ops
only: ids and rows never become Python lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

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
    _tensors: tuple | None = field(default=None, repr=False, compare=False)

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

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(workers [E + 1, R], cumulative shares [E + 1, R]). Row E stands for id -1 (no pair, NO_PAIR);
        a row without replicas holds NO_REPLICA; a missing replica's share is 2.0, past any pair's place."""
        if self._tensors is None:
            E = len(self.replicas)
            R = max(1, max(len(r) for r in self.replicas))
            workers = torch.full((E + 1, R), NO_REPLICA, dtype=torch.long)
            workers[E] = NO_PAIR
            cum = torch.full((E + 1, R), 2.0, dtype=torch.float64)
            for e, reps in enumerate(self.replicas):
                if not reps:
                    continue
                sh = self.shares[e] if self.shares else [1.0 / len(reps)] * len(reps)
                workers[e, : len(reps)] = torch.tensor(reps)
                workers[e, len(reps):] = reps[-1]
                c = torch.tensor(sh, dtype=torch.float64).cumsum(0)
                c[-1] = 1.0 + 1e-9  # absorb rounding so the last replica takes the tail
                cum[e, : len(reps)] = c
            self._tensors = (workers, cum)
        return self._tensors


@dataclass
class WorkerDispatch:
    """What one worker receives for one layer."""

    worker: int
    rows: torch.Tensor  # [n] token indices into the layer's input
    experts: torch.Tensor  # [n, K] int32, -1 where the pair goes to another worker (the wire's form)
    weights: torch.Tensor  # [n, K] float32


def assign_replicas(ids: torch.Tensor, routes: LayerRoutes) -> torch.Tensor:
    """The worker of every (token, expert) pair: ids [T, K] (-1: no pair) -> owners [T, K] (-1 where no pair).

    A replicated expert's pairs are split across its replicas by share, in token order, so the choice is
    deterministic for a given batch."""
    workers, cum = routes.tensors()
    if workers.shape[1] == 1:
        owner = workers[ids, 0]  # id -1 reads row E: NO_PAIR
    else:
        E = workers.shape[0] - 1
        flat = ids.reshape(-1)
        e = torch.where(flat < 0, E, flat)
        order = torch.argsort(e, stable=True)
        sorted_e = e[order]
        counts = torch.bincount(e, minlength=E + 1)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(e.numel()) - starts[sorted_e]
        place = (rank.double() + 0.5) / counts[sorted_e].double()  # where each pair sits in its expert's run
        idx = torch.searchsorted(cum[sorted_e], place[:, None]).squeeze(1).clamp_(max=workers.shape[1] - 1)
        owner = torch.empty(e.numel(), dtype=workers.dtype)
        owner[order] = workers[sorted_e, idx]
        owner = owner.view_as(ids)
    if int(owner.min()) == NO_REPLICA:
        raise NoReplicaError(routes.layer, int(ids[owner == NO_REPLICA][0]))
    return owner


def plan_dispatch(ids: torch.Tensor, weights: torch.Tensor, routes: LayerRoutes) -> list[WorkerDispatch]:
    """ids [T, K] int32, the wire's form (-1: no pair), weights [T, K] -> one WorkerDispatch per worker
    that has work, by worker id. A row whose pairs are all -1 goes to no worker."""
    owner = assign_replicas(ids, routes)  # [T, K]
    workers = torch.unique(owner)  # sorted: NO_PAIR first, if any
    if int(workers[0]) == NO_PAIR:
        workers = workers[1:]
    mine = owner == workers[:, None, None]  # [W, T, K]
    has = mine.any(dim=2)  # [W, T]
    which, rows = has.nonzero(as_tuple=True)  # by worker, then row: each worker's rows in order
    sel = mine[which, rows]  # [P, K]
    e = torch.where(sel, ids[rows], -1).to(torch.int32)  # already int32 from a gateway: no copy
    w = torch.where(sel, weights[rows], 0.0).float()
    bounds = has.sum(dim=1).cumsum(0)[:-1]
    return [WorkerDispatch(int(worker), r, ee, ww) for worker, r, ee, ww in
            zip(workers, rows.tensor_split(bounds), e.tensor_split(bounds), w.tensor_split(bounds))]


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
