"""Dispatch plans: every (token, expert) pair goes to exactly one replica, shares are honoured, and
the small-batch path plans exactly like the tensor path."""

from __future__ import annotations

import pytest
import torch

from moe_service.routing import LayerRoutes, NoReplicaError, combine, plan_dispatch
from moe_service.routing import dispatch


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
    # the plain-Python plan for small batches equals the tensor plan
    old = dispatch.SMALL_PLAN
    try:
        dispatch.SMALL_PLAN = -1
        tensor_plan = plan_dispatch(experts, weights, routes)
    finally:
        dispatch.SMALL_PLAN = old
    assert [d.worker for d in plan] == [d.worker for d in tensor_plan]
    for a, b in zip(plan, tensor_plan):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)


def test_shares_split_a_hot_expert_in_proportion():
    routes = LayerRoutes(0, [[0, 1]], [[0.25, 0.75]])
    experts = torch.zeros(400, 1, dtype=torch.long)
    for limit in (10**9, -1):  # both paths
        dispatch.SMALL_PLAN, old = limit, dispatch.SMALL_PLAN
        try:
            plan = {d.worker: len(d.rows) for d in plan_dispatch(experts, torch.ones(400, 1), routes)}
        finally:
            dispatch.SMALL_PLAN = old
        assert plan == {0: 100, 1: 300}


def test_no_replica_left_is_an_error_and_combine_adds_parts():
    routes = LayerRoutes(3, [[0], [1]]).without({1})
    with pytest.raises(NoReplicaError, match="expert 1 in layer 3"):
        plan_dispatch(torch.tensor([[0, 1]]), torch.ones(1, 2), routes)
    out = combine(3, [(torch.tensor([0, 2]), torch.ones(2, 4)), (torch.tensor([2]), torch.ones(1, 4))], torch.zeros(1, 4))
    assert out.tolist() == [[1.0] * 4, [0.0] * 4, [2.0] * 4]


def test_shared_experts_run_while_a_remote_result_is_pending(monkeypatch):
    """A backend may answer with a future (the gateway's does): the shared experts run before it is
    awaited, and the layer's output is the same as with the experts in-process."""
    from concurrent.futures import Future

    from moe_service.checkpoint import load_model

    model = load_model("tiny")
    moe = model.layers[model.args.moe_layers[0]].mlp
    x = torch.randn(5, model.args.hidden_size)
    expected = moe(x)
    pending: list[tuple[Future, torch.Tensor]] = []

    def backend(layer, h, weights, experts):
        f = Future()
        pending.append((f, moe.experts(h, weights, experts)))
        return f

    shared, seen = moe.shared_experts.forward, []

    def shared_then_answer(h):
        f, value = pending[0]
        seen.append(f.done())
        out = shared(h)
        f.set_result(value)  # the "remote" answer arrives after the shared experts ran
        return out

    monkeypatch.setattr(moe.shared_experts, "forward", shared_then_answer)
    assert torch.equal(moe(x, backend), expected)
    assert seen == [False]
