"""A live SIMULATED cluster (serving/simulated.py): 8 expert workers holding their answers to the cost model's
H200 time for DeepSeek-V2-Lite's experts, the real gateway, gRPC and controller (rebalancing by predicted
time), a Zipf trace. Its expert stage agrees with `moe-service simulate` within 15% before and after a live
rebalance, which fails no request and changes no token: at 64 decode streams (memory-bound, where the
rebalance must not slow it) and at prefill of 4000 tokens per layer call (compute-bound, where it pays
1.5x).

Only the held time is dilated; the hops around it (gRPC both ways, the workers' real compute) take what
they take on this machine, and far longer when other processes share its CPU. At x10000 an H200 layer
call of ~50 us is held ~0.5 s, so they stay a small part of the live stage however busy the machine is,
and the comparison is one of two quantities for the same placements in the same run."""

from __future__ import annotations

import pytest

from moe_service.bench import simulated_bench

pytestmark = pytest.mark.slow
TIME_SCALE = 10_000.0  # real seconds per simulated second


def agrees_with_simulate_through_a_rebalance(r: dict, new_tokens: int) -> None:
    print("\n" + simulated_bench.format_results(r))
    assert r["simulated"] and "SIMULATED" in simulated_bench.format_results(r)
    assert r["failed"] == 0 and r["tokens_unchanged"]
    assert all(len(o) == new_tokens for o in r["before"]["outputs"])
    assert r["moves"] > 0  # the trace's skew made the controller move replicas
    for phase in ("before", "after"):
        live, predicted = r[phase]["live_s"], r[phase]["predicted_s"]
        assert abs(live / predicted - 1) <= 0.15, (phase, live, predicted)


def test_decode_streams_a_time_rebalance_never_slows(ray_local):
    r = simulated_bench.run(workers=8, streams=64, new_tokens=4, time_scale=TIME_SCALE)
    agrees_with_simulate_through_a_rebalance(r, 4)
    # the controller plans from its load window, a sample of the trace the prediction takes: 2% for that
    assert r["after"]["predicted_s"] <= r["before"]["predicted_s"] * 1.02
    assert r["after"]["live_s"] <= r["before"]["live_s"] * 1.05  # token balance made it 3% slower here


def test_prefill_a_time_rebalance_lowers_the_expert_stage_1_5x(ray_local):
    r = simulated_bench.run(workers=8, prefill_tokens=4000, requests=1, time_scale=TIME_SCALE)
    agrees_with_simulate_through_a_rebalance(r, 1)
    assert r["before"]["live_s"] >= 1.5 * r["after"]["live_s"]
