"""The overload sweep of moe_service.bench.overload with its 1x and 4x bursts interleaved: each 4x burst's
goodput is judged against the 1x bursts just before and after it, the capacity of the same service measured
within seconds of it. (The bench measures its 1x bursts first and last, minutes apart: on a machine whose
CPU other processes share for a while, the two ends of its ratio are measured on different machines.)"""

from __future__ import annotations

from moe_service.bench import overload
from moe_service.bench.overload import CAPACITY, burst


def interleaved_sweep(svc, preset: str, new_tokens: int = 8) -> dict:
    """1x, 4x, 1x, 4x, 1x, 4x, 1x after a warm-up and the ingress floor, as `overload.sweep` measures each
    burst; the result reads as the bench's (overload.format_sweep prints it), with every 1x burst kept in
    `ones`. A 4x burst's `goodput_vs_1x` is its goodput over the mean of its two neighbours'."""
    from ray import serve

    from moe_service import load_model
    from moe_service.engine.engine import Engine
    from moe_service.engine.sampling import SamplingParams

    prompt = [1, 17, 42]
    want = Engine(load_model(preset)).generate([prompt], SamplingParams(max_new_tokens=new_tokens,
                                                                        ignore_eos=True))[0].output
    gateway = serve.get_app_handle("moe")
    burst(svc.address, 8, prompt, new_tokens, want)  # warm-up
    # the floor of a refusal: the same burst, every request refused at once by the gateway's checks (a token
    # id out of range), so what it costs is the ingress alone (Serve's proxy, Ray, the client)
    floor = burst(svc.address, 4 * CAPACITY, [10**6], new_tokens, want)
    rejected = gateway.debug_state.remote().result()["rejected"]
    rows = []
    for factor in (1, 4, 1, 4, 1, 4, 1):
        r = burst(svc.address, factor * CAPACITY, prompt, new_tokens, want)
        state = gateway.debug_state.remote().result()
        r["rejected_by_gateway"], rejected = state["rejected"] - rejected, state["rejected"]
        r.update(factor=factor, gateway_rss=state["rss_bytes"], proxy_rss=overload.rss_bytes(overload.proxy_pid()),
                 server_reject_p99_s=state["rejection_p99_s"], loop_lag_p99_s=state["loop_lag_p99_s"])
        rows.append(r)
    ones, fours = rows[0::2], rows[1::2]
    for i, r in enumerate(fours):
        r["goodput_vs_1x"] = r["goodput"] / ((ones[i]["goodput"] + ones[i + 1]["goodput"]) / 2)
    base = sorted(r["goodput"] for r in ones)[len(ones) // 2]
    for r in ones:
        r["goodput_vs_1x"] = r["goodput"] / base
    first4, again4 = fours[1], fours[2]
    return {"preset": preset, "capacity": CAPACITY, "new_tokens": new_tokens, "want": want, "rows": [ones[0], fours[0]],
            "ones": ones, "first_4x": first4, "second_4x": again4,
            "ingress_floor_4x": {"p99_s": floor["invalid_p99_s"], "wall_s": floor["wall_s"], "codes": floor["codes"]},
            "rss_over_high_water": overload.rss_over_high_water(rows[:-1])}  # up to the last 4x
