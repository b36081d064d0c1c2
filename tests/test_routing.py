"""Dispatch plans: every (token, expert) pair goes to exactly one replica, shares are honoured, and the
tensor planner plans exactly as a plain loop over the pairs would."""

from __future__ import annotations

import pytest
import torch

from moe_service.routing import LayerRoutes, NoReplicaError, combine, plan_dispatch


def reference_plan(experts: torch.Tensor, weights: torch.Tensor, routes: LayerRoutes) -> list[tuple]:
    """The replica rule as a plain loop: an expert's pairs split by share in token order (pair i of an
    expert's n sits at (i + 0.5) / n and goes to the replica whose cumulative share first reaches it);
    -1 is no pair. -> [(worker, rows, experts, weights)] by worker."""
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
            rank = seen.get(e, 0)
            seen[e] = rank + 1
            place = (rank + 0.5) / counts[e]
            shares = routes.shares[e] if routes.shares else [1.0 / len(reps)] * len(reps)
            acc, worker = 0.0, reps[-1]
            for r, sh in zip(reps, shares):
                acc += sh
                if place <= acc:
                    worker = r
                    break
            es, ws = per_worker.setdefault(worker, {}).setdefault(t, ([-1] * K, [0.0] * K))
            es[k], ws[k] = e, w
    return [(w, sorted(rows), [rows[t][0] for t in sorted(rows)], [rows[t][1] for t in sorted(rows)])
            for w, rows in sorted(per_worker.items())]


def planned(experts, weights, routes) -> list:
    """plan_dispatch's plan, checked against the reference and the wire's forms."""
    plan = plan_dispatch(experts, weights, routes)
    want = reference_plan(experts, weights, routes)
    assert [d.worker for d in plan] == [w for w, *_ in want]
    for d, (_, rows, ex, wt) in zip(plan, want):
        assert d.rows.tolist() == rows and d.experts.tolist() == ex and torch.equal(d.weights, torch.tensor(wt))
        assert d.experts.dtype == torch.int32 and d.weights.dtype == torch.float32
    return plan


def random_routes(E: int, W: int, seed: int) -> LayerRoutes:
    g = torch.Generator().manual_seed(seed)
    reps, shares = [], []
    for e in range(E):
        n = 1 + int(torch.randint(0, min(3, W), (1,), generator=g))
        ws = torch.randperm(W, generator=g)[:n].tolist()
        sh = torch.rand(n, generator=g) + 0.1
        reps.append(ws)
        shares.append((sh / sh.sum()).tolist())
    return LayerRoutes(0, reps, shares)


@pytest.mark.parametrize("T", [1, 3, 10, 40])
def test_every_pair_lands_once_and_paths_agree(T):
    E, K, W = 16, 4, 3
    routes = random_routes(E, W, T)
    g = torch.Generator().manual_seed(T)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    plan = plan_dispatch(experts, weights, routes)
    seen = torch.zeros(T, K, dtype=torch.long)
    for d in plan:
        assert len(set(d.rows.tolist())) == len(d.rows)  # a token at most once per worker
        for i, t in enumerate(d.rows.tolist()):
            for k in range(K):
                e = int(d.experts[i, k])
                if e >= 0:
                    assert d.worker in routes.replicas[e]
                    kk = experts[t].tolist().index(e)
                    assert float(d.weights[i, k]) == float(weights[t, kk])
                    seen[t, kk] += 1
    assert bool((seen == 1).all())
    planned(experts, weights, routes)


def test_shares_split_a_hot_expert_in_proportion():
    routes = LayerRoutes(0, [[0, 1]], [[0.25, 0.75]])
    plan = planned(torch.zeros(400, 1, dtype=torch.long), torch.ones(400, 1), routes)
    assert {d.worker: len(d.rows) for d in plan} == {0: 100, 1: 300}


def test_no_replica_left_is_an_error_and_combine_adds_parts():
    routes = LayerRoutes(3, [[0], [1]]).without({1})
    with pytest.raises(NoReplicaError, match="expert 1 in layer 3"):
        plan_dispatch(torch.tensor([[0, 1]]), torch.ones(1, 2), routes)
    out = combine(3, [(torch.tensor([0, 2]), torch.ones(2, 4)), (torch.tensor([2]), torch.ones(1, 4))], torch.zeros(1, 4))
    assert out.tolist() == [[1.0] * 4, [0.0] * 4, [2.0] * 4]


def test_shared_experts_run_while_a_remote_result_is_pending(monkeypatch):
    """A dispatcher sends a layer's routed experts and answers later: the shared experts run before the
    model waits, and the layer's output is the same as in-process."""
    from types import SimpleNamespace

    from moe_service.checkpoint import load_model

    model = load_model("tiny")
    moe = model.layers[model.args.moe_layers[0]].mlp
    x = torch.randn(5, model.args.hidden_size)
    expected = moe(x)
    events: list[str] = []

    class Dispatcher:
        @staticmethod
        def send(layer, h, weights, experts):
            value = moe.experts(h, weights, experts)
            events.append("sent")

            def wait():
                events.append("answer awaited")
                return value

            return SimpleNamespace(wait=wait)

    shared = moe.shared_experts.forward

    def shared_then_answer(h):
        events.append("shared experts")
        return shared(h)

    monkeypatch.setattr(moe.shared_experts, "forward", shared_then_answer)
    assert torch.equal(moe(x, Dispatcher), expected)
    assert events == ["sent", "shared experts", "answer awaited"]


@pytest.mark.parametrize("T", [3, 40])
@pytest.mark.parametrize("replicated", [False, True])
def test_padding_is_never_planned_as_an_expert(T, replicated):
    """A re-plan gets the lost worker's pairs with -1 elsewhere (the wire's convention): -1 is no
    pair, not the last expert. It counts toward no split, needs no replica, and a row that holds
    only padding is sent nowhere."""
    E, K = 16, 4
    last = E - 1
    # the last expert lost its only replica: if -1 were read as an id, planning would fail
    reps = [[e % 3, (e + 1) % 3] if replicated else [e % 3] for e in range(E)]
    reps[last] = []
    routes = LayerRoutes(0, reps)
    g = torch.Generator().manual_seed(T)
    experts = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    keep = torch.rand(T, K, generator=g) < 0.3
    keep[::4] = False  # some rows are padding only
    pending = torch.where(keep, experts, -1)
    plan = planned(pending, weights, routes)
    sent = torch.cat([d.rows for d in plan]) if plan else torch.zeros(0, dtype=torch.long)
    assert set(sent.tolist()) == set(keep.any(1).nonzero().squeeze(1).tolist())
    count = torch.zeros(T, K, dtype=torch.long)
    for d in plan:
        assert bool((d.experts >= 0).any(1).all()), "a row with only padding was sent"
        for i, t in enumerate(d.rows.tolist()):
            for k in range(K):
                if d.experts[i, k] >= 0:
                    assert d.worker in reps[int(d.experts[i, k])]
                    count[t, k] += 1
                    assert int(d.experts[i, k]) == int(experts[t, k])
                    assert float(d.weights[i, k]) == float(weights[t, k])
    assert torch.equal(count, keep.long())


def test_padding_does_not_skew_a_replicated_split():
    """An expert split 50/50 over two replicas: the split of its real pairs is the same with or
    without padding around them (padding counted as expert E-1 used to shift the last expert's)."""
    E = 4
    routes = LayerRoutes(0, [[0]] * (E - 1) + [[0, 1]], [[1.0]] * (E - 1) + [[0.5, 0.5]])
    experts = torch.full((80, 1), E - 1)
    padded = torch.cat([experts, torch.full((80, 1), -1)], 1)
    a, b = planned(experts, torch.ones(80, 1), routes), planned(padded, torch.ones(80, 2), routes)
    assert {d.worker: len(d.rows) for d in a} == {d.worker: len(d.rows) for d in b} == {0: 40, 1: 40}
