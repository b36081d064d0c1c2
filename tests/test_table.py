"""The controller's table without Ray: versions and the long poll, the placement it starts from, and the
placement recovery rebuilds from the workers still running."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from moe_service.serving.control.table import TableBoard, initial_placement, rebuild_placement

LAYERS, E = [1, 2], 8


def test_recovery_rebuilds_what_the_running_workers_host_and_names_the_lost():
    # worker 1 was lost: experts it alone held go back to it (it restarts with them); worker 2 also holds
    # expert 0 of layer 1, so that one keeps its surviving replica and gains no new one
    found = {0: [(1, e) for e in range(0, 8, 2)] + [(2, e) for e in range(4)],
             2: [(1, 0), (1, 1), (2, 4), (2, 5)]}
    placement, lost = rebuild_placement(found, LAYERS, E, min_workers=3, replicas_per_worker=8)
    assert lost == [1]
    hosts = placement.hosts  # [L, E, W]
    assert hosts.shape == (2, 8, 3) and hosts.any(axis=2).all(), "an expert has no host"
    for w, pairs in found.items():  # everything still running is kept where it is
        for layer, e in pairs:
            assert hosts[LAYERS.index(layer), e, w]
    orphans = {(l, e) for l in range(2) for e in range(E)} - {(LAYERS.index(l), e) for ps in found.values() for l, e in ps}
    assert orphans and all(hosts[l, e].tolist() == [False, True, False] for l, e in orphans)
    np.testing.assert_allclose(placement.fractions.sum(axis=2), 1.0)


def test_recovery_with_no_worker_lost_spreads_orphans_over_the_running_ones():
    found = {0: [(1, e) for e in range(4)], 1: [(1, e) for e in range(4, 7)] + [(2, e) for e in range(8)]}
    placement, lost = rebuild_placement(found, LAYERS, E, min_workers=2, replicas_per_worker=16)
    assert lost == [] and placement.hosts[0, 7].any() and placement.hosts.any(axis=2).all()


def test_initial_placement_replicates_the_first_experts_when_asked():
    plain = initial_placement(2, 0, 2, E, 5)
    assert plain.replica_counts().max() == 1
    redundant = initial_placement(2, 2, 2, E, 5)
    assert (redundant.replica_counts()[:, :2] == 2).all() and (redundant.replica_counts()[:, 2:] == 1).all()


def test_the_long_poll_returns_at_a_newer_version_and_not_before():
    async def go():
        healthy = {0: "a:1", 1: "b:1"}
        board = TableBoard(LAYERS, E, lambda: healthy)
        v1 = await board.publish(initial_placement(2, 0, 2, E, 4), ready=True)
        t = board.snapshot()
        assert t["version"] == v1 and t["ready"] and not t["draining"] and t["addresses"] == healthy
        assert t["routes"][1]["replicas"][0] == [0]
        waiting = asyncio.ensure_future(board.wait(v1, timeout_s=30))
        await asyncio.sleep(0)  # let the poll start: it must not return without a newer version
        assert not waiting.done()
        v2 = await board.publish(draining=True)
        t = await asyncio.wait_for(waiting, 5)
        assert t["version"] == v2 > v1 and t["draining"]
        # a version below what a gateway holds is raised past it
        board.at_least(v2 + 100)
        assert await board.publish() == v2 + 101
        # an expert whose every host is unhealthy: the table is not ready
        del healthy[1]
        assert not board.snapshot()["ready"]
        timed_out = await board.wait(board.version, timeout_s=0.01)
        assert timed_out["version"] == board.version

    asyncio.run(go())


@pytest.mark.parametrize("min_workers", [1, 4])
def test_recovery_counts_workers_from_the_highest_found_or_the_settings(min_workers):
    found = {2: [(1, e) for e in range(E)] + [(2, e) for e in range(E)]}
    placement, lost = rebuild_placement(found, LAYERS, E, min_workers=min_workers, replicas_per_worker=16)
    assert placement.num_workers == max(3, min_workers) and lost == [w for w in range(max(3, min_workers)) if w != 2]
