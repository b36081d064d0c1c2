"""Overload: past capacity the gateway says no at once (RESOURCE_EXHAUSTED naming the limit), goodput
holds up at 4x, no request ends CANCELLED, UNKNOWN or INTERNAL, and the last burst
holds no more memory than the peak of the bursts before it.

Every time here is judged against another measured in the same run: a 4x burst's goodput against the 1x
bursts on either side of it, a refusal against what refusing at once costs (the ingress floor, the same
burst's admitted requests)."""

from __future__ import annotations

import shutil
import statistics

import pytest

from moe_service.bench import overload
from moe_service.serving.local import start_service
from tests.support.overload import interleaved_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(ray_local):
    # the preset named, the limits left at their defaults, the HTTP API on: `moe-service serve --preset tiny`.
    # The HTTP front runs beside the gateway, so gRPC requests pass no ASGI wrapper (docs/performance.md, "Ingress")
    svc = start_service(dict(model="tiny", workers=2, gpus_per_worker=1.0, gateway_num_cpus=0,
                             expert_bind_host="127.0.0.1", sd_port=0, rebalance_interval_s=0,
                             overlap_shared_experts=False, scheduler={"micro_batches": 1}))
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def sweep(service):
    r = interleaved_sweep(service, "tiny")
    print("\n" + overload.format_sweep(r))
    return r


def test_four_times_capacity_sheds_load_without_collapse(sweep):
    r = sweep
    for one in r["ones"]:
        assert one["codes"] == {"OK": 300} and one["exact"] == 300, "1x: every request admitted and exact"
    fours = (r["rows"][1], r["first_4x"], r["second_4x"])
    print("1x goodput, burst by burst: " + ", ".join(f"{one['goodput']:.1f}/s" for one in r["ones"]) +
          "; 4x vs the 1x bursts beside it: " + ", ".join(f"{row['goodput_vs_1x']:.2f}x" for row in fours))
    for row in fours:
        assert set(row["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, row["codes"]  # no CANCELLED/UNKNOWN/INTERNAL
        assert row["wrong"] == 0 and row["codes"].get("RESOURCE_EXHAUSTED")
        # the gateway's own metric, arrival to refusal: at most a sixtieth of what an admitted request of the
        # same burst takes (its p50; about 0.1 s on an idle machine, where that p50 is 5-6 s: docs/performance.md)
        refusal_s, admitted_s = row["server_reject_p99_s"], row["latency_p50_s"]
        assert refusal_s <= admitted_s / 60, (refusal_s, admitted_s)
        # as the client sees it, a refusal costs no more than the ingress itself takes to refuse the same
        # burst at once (on this machine that floor is seconds: docs/performance.md)
        assert row["reject_p99_s"] <= 1.5 * r["ingress_floor_4x"]["p99_s"] + 0.5
        assert all("max_queue" in m and "retry in about" in m for m in row["reject_messages"])
    # goodput is a rate over a few seconds on a shared 2-core machine: the claim is about the 4x regime, so it
    # is judged on the median of its three bursts (each of which must also not collapse)
    ratios = sorted(row["goodput_vs_1x"] for row in fours)
    assert ratios[1] >= 0.8 and ratios[0] >= 0.5, ratios
    # a leak would carry the last burst past the peak of every burst before it (docs/performance.md, "Memory")
    growth = r["rss_over_high_water"]
    assert growth["gateway_rss"] < 0.05 and growth["proxy_rss"] < 0.05, growth


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (scripts/setup.sh installs it)")
def test_the_grpc_front_refuses_before_python(service, sweep):
    """The same 4x burst through HAProxy in front of the same service (`moe-service serve --front`): a refusal
    comes back in under a second on this machine, far below what the same burst's refusals cost through
    Serve's proxy, with the retry hint as a real gRPC trailer, and every admitted answer exact."""
    base = statistics.median(one["goodput"] for one in sweep["ones"])
    front = overload.front_burst(service, [1, 17, 42], sweep["new_tokens"], sweep["want"], base)
    print(f"\nthrough the front: {front['codes']}, refusal p99 {front['reject_p99_s'] * 1e3:.0f} ms "
          f"(through Serve's proxy: the ingress floor p99 {sweep['ingress_floor_4x']['p99_s'] * 1e3:.0f} ms, "
          f"the 4x bursts' {[round(row['reject_p99_s'] * 1e3) for row in (sweep['first_4x'], sweep['second_4x'])]} ms)"
          f"; goodput {front['goodput']:.1f}/s, {front['goodput_vs_1x']:.2f}x the 1x bursts")
    assert set(front["codes"]) == {"OK", "RESOURCE_EXHAUSTED"}, front["codes"]
    assert front["wrong"] == 0 and front["exact"] == front["codes"]["OK"] >= front["front_limit"] // 2
    # refused before Python: a small part of what the ingress floor of the same service costs
    assert front["reject_p99_s"] <= sweep["ingress_floor_4x"]["p99_s"] / 4, front["reject_p99_s"]
    assert front["pushback_on_every_rejection"] and front["retry_pushback_ms"] == 1000
    assert all("limit of" in m and "retry in about" in m for m in front["reject_messages"])
    assert front["goodput_vs_1x"] >= 0.5  # no collapse; the 0.8x claim is judged on the median above
