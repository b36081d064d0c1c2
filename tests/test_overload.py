"""Overload: past capacity the gateway says no at once (RESOURCE_EXHAUSTED naming the limit), goodput
holds up at 4x, no request ends CANCELLED, UNKNOWN or INTERNAL, and a second burst costs no memory.

Every time here is judged against another measured in the same run: a 4x burst's goodput against the 1x
bursts on either side of it, a refusal against what refusing at once costs (the ingress floor, the same
burst's admitted requests)."""

from __future__ import annotations

import pytest

from moe_service.bench import overload
from moe_service.serving.local import start_service
from tests.support.overload import interleaved_sweep

pytestmark = pytest.mark.slow


def test_four_times_capacity_sheds_load_without_collapse(ray_local):
    # the preset named, the limits left at their defaults: `moe-service serve --preset tiny --no-http-api`.
    # With the HTTP API the 4x goodput here is 0.73-0.89x: Serve's ASGI ingress wrapper slows every request
    # of the replica (docs/performance.md, "Overload")
    svc = start_service(dict(model="tiny", workers=2, gpus_per_worker=1.0, gateway_num_cpus=0, http_api=False,
                             expert_bind_host="127.0.0.1", sd_port=0, rebalance_interval_s=0,
                             overlap_shared_experts=False, scheduler={"micro_batches": 1}))
    try:
        r = interleaved_sweep(svc, "tiny")
    finally:
        svc.shutdown()
    print("\n" + overload.format_sweep(r))
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
    growth = r["rss_growth_second_4x"]
    assert growth["gateway_rss"] < 0.05 and growth["proxy_rss"] < 0.05, growth
