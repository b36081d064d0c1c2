"""One MoE layer's data path on the gateway: choose a replica for every (token, expert) pair, group
the pairs by worker (each token at most once per worker), and add the workers' partial sums back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

# T tokens, K experts per token, E experts in the layer, R max replicas of one expert, D hidden


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
    _tensors: dict = field(default_factory=dict, repr=False, compare=False)

    def without(self, excluded: Iterable[int]) -> "LayerRoutes":
        """The same routes with some workers removed; shares renormalised over what is left."""
        ex = set(excluded)
        if not ex:
            return self
        reps, shares = [], []
        for e, workers in enumerate(self.replicas):
            sh = self.shares[e] if self.shares else [1.0] * len(workers)
            kept = [(w, s) for w, s in zip(workers, sh) if w not in ex]
            if not kept:
                reps.append([])
                shares.append([])
                continue
            total = sum(s for _, s in kept)
            reps.append([w for w, _ in kept])
            # the kept replicas' shares, renormalised (all of them zero: an equal split)
            shares.append([s / total for _, s in kept] if total else [1.0 / len(kept)] * len(kept))
        return LayerRoutes(self.layer, reps, shares)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(workers [E, R] padded with -1, cumulative shares [E, R] padded with 2.0, R)."""
        if not self._tensors:
            E = len(self.replicas)
            R = max(1, max(len(r) for r in self.replicas))
            workers = torch.full((E, R), -1, dtype=torch.long)
            cum = torch.full((E, R), 2.0, dtype=torch.float64)
            for e, reps in enumerate(self.replicas):
                if not reps:
                    continue
                sh = self.shares[e] if self.shares else [1.0 / len(reps)] * len(reps)
                workers[e, : len(reps)] = torch.tensor(reps)
                c = torch.tensor(sh, dtype=torch.float64).cumsum(0)
                c[-1] = 1.0 + 1e-9  # absorb rounding so the last replica takes the tail
                cum[e, : len(reps)] = c
            self._tensors.update(workers=workers, cum=cum, R=R)
        t = self._tensors
        return t["workers"], t["cum"], t["R"]


@dataclass
class WorkerDispatch:
    """What one worker receives for one layer."""

    worker: int
    rows: torch.Tensor  # [n] token indices into the layer's input
    experts: torch.Tensor  # [n, K] int32, -1 where the pair goes to another worker
    weights: torch.Tensor  # [n, K] float32


def assign_replicas(experts: torch.Tensor, routes: LayerRoutes) -> torch.Tensor:
    """The worker of every (token, expert) pair: [T, K] -> [T, K], -1 where `experts` is -1 (no pair).

    A replicated expert's pairs are split across its replicas by share, in token order, so the
    choice is deterministic for a given batch.
    """
    workers, cum, R = routes.tensors()
    flat = experts.reshape(-1).long()
    out = torch.full_like(flat, -1)
    pairs = (flat >= 0).nonzero().squeeze(1)  # padding never counts toward an expert's split
    e = flat[pairs]
    if R == 1:
        owner = workers[e, 0]
    else:
        E = workers.shape[0]
        order = torch.argsort(e, stable=True)
        sorted_e = e[order]
        counts = torch.bincount(e, minlength=E)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(e.numel()) - starts[sorted_e]
        frac = (rank.double() + 0.5) / counts[sorted_e].double()  # where each pair sits in its expert's run
        idx = torch.searchsorted(cum[sorted_e], frac[:, None]).squeeze(1).clamp_(max=R - 1)
        owner = torch.empty_like(e)
        owner[order] = workers[sorted_e, idx]
    if bool((owner < 0).any()):
        raise NoReplicaError(routes.layer, int(e[(owner < 0).nonzero()[0, 0]]))
    out[pairs] = owner
    return out.view_as(experts)


SMALL_PLAN = 64  # (token, expert) pairs up to which planning in plain Python beats ~20 tensor ops


def plan_dispatch(experts: torch.Tensor, weights: torch.Tensor, routes: LayerRoutes) -> list[WorkerDispatch]:
    """experts [T, K] (-1: no pair, as on the wire), weights [T, K] -> one WorkerDispatch per worker
    that has work, by worker id. A row whose pairs are all -1 goes to no worker."""
    if experts.numel() <= SMALL_PLAN:
        return _plan_small(experts, weights, routes)
    owner = assign_replicas(experts, routes)  # [T, K]
    out = []
    for w in torch.unique(owner[owner >= 0]).tolist():
        mine = owner == w  # [T, K]
        rows = mine.any(dim=1).nonzero().squeeze(1)
        e = torch.where(mine, experts, -1)[rows].to(torch.int32)
        wt = torch.where(mine, weights, 0.0)[rows].float()
        out.append(WorkerDispatch(int(w), rows, e, wt))
    return out


def _plan_small(experts: torch.Tensor, weights: torch.Tensor, routes: LayerRoutes) -> list[WorkerDispatch]:
    """The same plan as the tensor path (same replica rule: an expert's pairs split by share in token
    order), computed over Python lists: decode steps have a handful of tokens."""
    ex, wt = experts.tolist(), weights.tolist()
    K = len(ex[0]) if ex else 0
    counts: dict[int, int] = {}
    for row in ex:
        for e in row:
            if e >= 0:
                counts[e] = counts.get(e, 0) + 1
    seen: dict[int, int] = {}
    per_worker: dict[int, dict[int, tuple[list[int], list[float]]]] = {}
    for t, (row, wrow) in enumerate(zip(ex, wt)):
        for k, (e, w) in enumerate(zip(row, wrow)):
            if e < 0:
                continue
            reps = routes.replicas[e]
            if not reps:
                raise NoReplicaError(routes.layer, e)
            if len(reps) == 1:
                worker = reps[0]
            else:
                rank = seen.get(e, 0)
                seen[e] = rank + 1
                frac = (rank + 0.5) / counts[e]
                shares = routes.shares[e] if routes.shares else [1.0 / len(reps)] * len(reps)
                acc, worker = 0.0, reps[-1]
                for r, sh in zip(reps, shares):
                    acc += sh
                    if frac <= acc:
                        worker = r
                        break
            es, ws = per_worker.setdefault(worker, {}).setdefault(t, ([-1] * K, [0.0] * K))
            es[k], ws[k] = e, w
    out = []
    for worker in sorted(per_worker):
        rows = sorted(per_worker[worker])
        out.append(WorkerDispatch(
            worker, torch.tensor(rows, dtype=torch.long),
            torch.tensor([per_worker[worker][t][0] for t in rows], dtype=torch.int32),
            torch.tensor([per_worker[worker][t][1] for t in rows], dtype=torch.float32)))
    return out


def combine(num_tokens: int, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Add each worker's rows `(rows [n], output [n, D])` into a `[T, D]` tensor (`out` if given), in
    the given order."""
    if out is None:
        out = torch.zeros(num_tokens, like.shape[-1], dtype=like.dtype, device=like.device)
    else:
        out.zero_()
    for rows, y in parts:
        out.index_add_(0, rows.to(out.device), y.to(out.dtype))
    return out
