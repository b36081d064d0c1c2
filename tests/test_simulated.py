"""A live SIMULATED cluster (serving/simulated.py): 8 expert workers holding their answers to the cost model's
H200 time for DeepSeek-V2-Lite's experts, the real gateway, gRPC and controller, 64 decode streams on a Zipf
trace. Its expert stage agrees with `moe-service simulate` within 15% before and after a live rebalance,
which fails no request and changes no token."""

from __future__ import annotations

import pytest

from moe_service.bench import simulated_bench

pytestmark = pytest.mark.slow
RAY_GPUS = 8  # a logical GPU per simulated worker (ray_local)


def test_live_simulated_cluster_agrees_with_simulate_through_a_rebalance(ray_local):
    r = simulated_bench.run(workers=8, streams=64, new_tokens=6)
    print("\n" + simulated_bench.format_results(r))
    assert r["simulated"] and "SIMULATED" in simulated_bench.format_results(r)
    assert r["failed"] == 0 and r["tokens_unchanged"]
    assert all(len(o) == 6 for o in r["before"]["outputs"])
    assert r["moves"] > 0  # the trace's skew made the controller move replicas
    for phase in ("before", "after"):
        live, predicted = r[phase]["live_s"], r[phase]["predicted_s"]
        assert abs(live / predicted - 1) <= 0.15, (phase, live, predicted)
