"""Every expert redundant (placement/redundancy.py): after every plan, re-plan and scale step, on random loads
and for both objectives, every expert has at least `min_replicas` replicas on distinct workers. Pure
functions, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_service.capacity.costmodel import DEVICES, SHAPES, worker_cost
from moe_service.placement import Placement, plan, zipf_load
from moe_service.placement.redundancy import check_redundancy, live_replicas, standby_slots, with_standbys
from moe_service.routing.dispatch import LayerRoutes
from moe_service.serving.control.table import initial_placement


def slots(experts: int, workers: int, m: int) -> int:
    """The controller's default: every expert once + 25%, and room for the standbys."""
    return math.ceil(1.25 * experts / workers) + standby_slots(experts, workers, m)


def assert_redundant(p: Placement, m: int) -> None:
    # hosts is [L, E, W] bool: a worker holds an expert once, so counts are distinct workers
    assert p.replica_counts().min() >= m
    assert p.used_replicas().max() <= p.replicas_per_worker


def cases(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        workers = int(rng.integers(2, 13))
        m = int(rng.integers(2, min(3, workers) + 1))
        experts = int(rng.choice([8, 16, 64, 160]))
        yield rng, zipf_load(2, experts, float(rng.uniform(0.6, 1.6)), 1e5, rng), workers, m


@pytest.mark.parametrize("case", range(40))
def test_every_plan_replan_and_scale_step_keeps_min_replicas(case):
    rng, load, workers, m = next(iter(cases(1, case)))
    E = load.shape[1]
    spw = slots(E, workers, m)
    p = plan(load, workers, spw, min_replicas=m)
    assert_redundant(p, m)
    for _ in range(3):  # drift
        load = load * rng.uniform(0.5, 1.5, load.shape)
        p = plan(load, workers, spw, current=p, min_replicas=m)
        assert_redundant(p, m)
    # a scale step: the slots stay; a worker more, or fewer while they still hold every expert m times
    for w in (workers + 1, workers):
        if w * (spw - standby_slots(E, w, m)) >= E and w >= m:
            p = plan(load, w, spw, current=p, min_replicas=m)
            assert p.num_workers == w
            assert_redundant(p, m)


@pytest.mark.parametrize("case", range(12))
def test_time_aware_plans_keep_min_replicas_too(case):
    """Time-aware placement alone keeps one replica of most experts; with min_replicas, standbys."""
    rng, load, workers, m = next(iter(cases(1, 100 + case)))
    spw = slots(load.shape[1], workers, m)
    cost = worker_cost(SHAPES["DeepSeek-V2-Lite"], DEVICES["H200"])
    p = plan(load, workers, spw, objective="time", worker_seconds=cost, pairs_per_step=256 * 6, min_replicas=m)
    assert_redundant(p, m)
    p = plan(load * rng.uniform(0.5, 1.5, load.shape), workers, spw, current=p, objective="time",
             worker_seconds=cost, pairs_per_step=256 * 6, min_replicas=m)
    assert_redundant(p, m)


def test_standbys_get_no_tokens_until_the_others_are_lost():
    load = zipf_load(1, 16, 1.2, 1e5, np.random.default_rng(0))
    p = plan(load, 4, slots(16, 4, 2), min_replicas=2)
    active = plan(load, 4, slots(16, 4, 2) - standby_slots(16, 4, 2))
    assert np.array_equal(p.fractions, active.fractions)  # the split is token balance's
    single = [e for e in range(16) if len([f for _, f in p.share(0, e) if f > 0]) == 1]
    assert single, "some expert is served by one replica"
    e = single[0]
    serving = next(w for w, f in p.share(0, e) if f > 0)
    routes = LayerRoutes(0, [p.replicas(0, x) for x in range(16)], [[f for _, f in p.share(0, x)] for x in range(16)])
    left = routes.without({serving})
    assert left.replicas[e] and serving not in left.replicas[e] and abs(sum(left.shares[e]) - 1) < 1e-9


def test_a_replan_of_the_same_load_loads_nothing_new():
    """Standbys go back where they were, and actives stay: a re-plan may drop a replica nobody serves from,
    but it places no new one (no weights to load)."""
    load = zipf_load(2, 64, 1.2, 1e5, np.random.default_rng(1))
    spw = slots(64, 6, 2)
    p = plan(load, 6, spw, min_replicas=2)
    again = plan(load, 6, spw, current=p, min_replicas=2)
    assert again.moves_from(p) == 0 and not (again.hosts & ~p.hosts).any()
    assert np.allclose(again.balancedness(load), p.balancedness(load))


def test_the_first_placement_is_redundant_and_live_replicas_count_the_healthy():
    p = initial_placement(3, 0, 2, 16, slots(16, 3, 2), min_replicas=2)
    assert_redundant(p, 2)
    assert live_replicas(p, {0, 1, 2}).min() >= 2
    assert live_replicas(p, {0, 1}).min() >= 1  # one worker lost: every expert still has a replica
    p = initial_placement(4, 2, 2, 16, slots(16, 4, 2), min_replicas=2)
    assert_redundant(p, 2)


def test_impossible_settings_say_what_is_missing():
    with pytest.raises(ValueError, match="needs at least as many workers"):
        check_redundancy(16, 1, 32, 2)
    with pytest.raises(ValueError, match="cannot hold every expert 2 times"):
        check_redundancy(16, 4, 5, 2)
    with pytest.raises(ValueError, match="cannot hold every expert 2 times"):
        with_standbys(Placement.round_robin(1, 4, 2, 2), 2, 2)  # full: no room left for standbys
