"""Time-aware placement (placement/timeaware.py) and the capacity planner (simulate.py): pure functions, no
Ray. Property tests over random Zipf loads, in the style of test_placement.py."""

from __future__ import annotations

import numpy as np
import pytest

from moe_service.capacity import simulate
from moe_service.capacity.costmodel import DEVICES, SHAPES, Device, worker_cost
from moe_service.placement import Placement, plan, zipf_load
from moe_service.placement.timeaware import floor_seconds, predicted_seconds

LITE = SHAPES["DeepSeek-V2-Lite"]
# a device where compute matters at moderate batch (so replication can pay), an H200 (memory-bound), and
# one like this CPU (reads then arithmetic, not overlapped; 2+ rows read slower than one)
SLOW_FLOPS = Device("test device", 1e12, 2e12, "test", call_s=5e-6)
CPU_LIKE = Device("cpu-like", 18e9, 1e11, "test", itemsize=4, call_s=45e-6, multi_row_bandwidth=12.7e9, overlap=False)


def cost_on(dev: Device):
    return worker_cost(LITE, dev)


def cases():
    rng = np.random.default_rng(7)
    for i in range(12):
        workers = int(rng.integers(2, 9))
        experts = int(rng.choice([16, 32, 64]))
        spw = -(-experts * 5 // (4 * workers)) + int(rng.integers(0, 3))
        yield (zipf_load(2, experts, float(rng.uniform(0.6, 1.6)), 1e5, rng), workers, spw,
               float(rng.choice([8, 32, 256, 4096])) * 6, [SLOW_FLOPS, DEVICES["H200"], CPU_LIKE][i % 3])


@pytest.mark.parametrize("load,workers,spw,pairs,dev", list(cases()))
def test_time_aware_is_valid_and_never_predicted_slower_than_token_balance(load, workers, spw, pairs, dev):
    cost = cost_on(dev)
    ta = plan(load, workers, spw, objective="time", worker_seconds=cost, pairs_per_step=pairs)
    tb = plan(load, workers, spw)
    rr = Placement.round_robin(*load.shape, workers, spw)
    # the plan is for the cluster asked about (Placement itself enforces every expert hosted and the slots)
    assert (ta.num_layers, ta.num_experts, ta.num_workers, ta.replicas_per_worker) == (*load.shape, workers, spw)
    for layer, row in enumerate(load):
        lam = row / row.sum() * pairs
        t_ta = predicted_seconds(lam, ta.fractions[layer], cost).max()
        assert t_ta <= predicted_seconds(lam, tb.fractions[layer], cost).max() * (1 + 1e-9)
        assert t_ta <= predicted_seconds(lam, rr.fractions[layer], cost).max() * (1 + 1e-9)
        # the floor bounds every placement, and a re-plan from one never predicts worse than it
        floor = floor_seconds(lam, workers, cost)
        assert floor <= t_ta * (1 + 1e-9) and floor <= predicted_seconds(lam, tb.fractions[layer], cost).max()
        again = plan(load, workers, spw, current=rr, objective="time", worker_seconds=cost, pairs_per_step=pairs)
        assert predicted_seconds(lam, again.fractions[layer], cost).max() <= (
            predicted_seconds(lam, rr.fractions[layer], cost).max() * (1 + 1e-9))


@pytest.mark.parametrize("load,workers,spw,pairs,dev", list(cases()))
def test_a_hot_expert_is_replicated_only_where_that_lowers_the_maximum(load, workers, spw, pairs, dev):
    cost = cost_on(dev)
    ta = plan(load, workers, spw, objective="time", worker_seconds=cost, pairs_per_step=pairs)
    for layer, row in enumerate(load):
        lam = row / row.sum() * pairs
        best = predicted_seconds(lam, ta.fractions[layer], cost).max()
        for e in np.flatnonzero(ta.hosts[layer].sum(axis=1) > 1):
            hosts = np.flatnonzero(ta.hosts[layer, e])
            # drop each extra replica in turn, its tokens back on the others: never faster
            for drop in hosts:
                frac = ta.fractions[layer].copy()
                keep = [w for w in hosts if w != drop]
                frac[e] = 0.0
                frac[e, keep] = 1.0 / len(keep)
                assert predicted_seconds(lam, frac, cost).max() >= best * (1 - 1e-9)


def test_memory_bound_small_batches_replicate_less_than_token_balance():
    """On an H200 at decode batch, a replica doubles an expert's weight reads for little compute: the time
    objective keeps (almost) one replica per expert where token balance spends the spare slots."""
    load = zipf_load(4, 64, 1.2, 1e5, np.random.default_rng(0))
    ta = plan(load, 8, 10, objective="time", worker_seconds=cost_on(DEVICES["H200"]), pairs_per_step=32 * 6)
    tb = plan(load, 8, 10)
    assert ta.replica_counts().sum() < tb.replica_counts().sum()


def test_time_objective_needs_its_inputs():
    load = zipf_load(1, 8, 1.0, 100, np.random.default_rng(0))
    with pytest.raises(ValueError, match="worker_seconds and pairs_per_step"):
        plan(load, 2, 5, objective="time")
    with pytest.raises(ValueError, match="objective"):
        plan(load, 2, 5, objective="speed")


def test_simulate_says_simulated_and_scales_with_workers():
    r = simulate.run("DeepSeek-V2-Lite", DEVICES["H200"], gateways=1, workers=8, streams=64)
    assert r["simulated"] and "SIMULATED" in simulate.format_results(r)
    assert set(r["policies"]) == set(simulate.POLICIES)
    for s in r["policies"].values():
        assert s["simulated"] and s["step_s"] == pytest.approx(s["gateway_s"] + s["dispatch_s"] + s["experts_s"])
    rows = simulate.sweep_workers("DeepSeek-V2-Lite", DEVICES["H200"], 1, 64, [2, 4, 8, 16])
    stage = [row["expert_stage_s_per_layer"] for row in rows]
    assert stage == sorted(stage, reverse=True)  # more workers, less of each layer's experts on the slowest


def test_simulate_reads_a_recorded_trace(tmp_path):
    args = simulate.model_args("tiny")
    load = np.ones((len(args.moe_layers), args.n_routed_experts))
    load[:, 0] = 50
    (tmp_path / "window.json").write_text(__import__("json").dumps({"load": load.tolist()}))
    assert np.array_equal(simulate.trace(args, str(tmp_path / "window.json")), load)
    with pytest.raises(ValueError, match="routes over"):
        simulate.trace(simulate.model_args("bench"), str(tmp_path / "window.json"))


def test_simulation_settings_are_checked_and_trace_routing_is_a_function_of_the_hidden_states():
    import torch

    from moe_service.serving.simulated import Simulation

    with pytest.raises(ValueError, match="unknown simulate settings"):
        Simulation.from_dict({"devce": "H200"})
    with pytest.raises(ValueError, match="unknown device"):
        Simulation.from_dict({"device": "TPU"})
    with pytest.raises(ValueError, match="zipf"):
        Simulation.from_dict({"routing": "uniform"})
    with pytest.raises(ValueError, match="existing file"):
        Simulation.from_dict({"routing": "window:/nonexistent/window.json"})
    sim = Simulation.from_dict({"device": "H200", "routing": "zipf:1.2", "time_scale": 100})
    args = simulate.model_args("tiny-64")  # MoE layers 1 and 2, 64 experts, top-6, hidden 64
    trace = sim.trace(args)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    together = trace.route(1, x, 6)
    assert torch.equal(together, trace.route(1, x.clone(), 6))  # the same hidden states, the same experts
    assert not torch.equal(together, trace.route(2, x, 6))  # each layer its own hot experts
    assert all(len(set(row)) == 6 for row in together.tolist())
    counts = torch.bincount(together.reshape(-1), minlength=64).float()
    assert counts.max() > 4 * counts.mean()  # skewed as the trace says
    # what `simulate` takes for this trace is what the router draws: k distinct experts per token, the hot
    # ones saturating at once per token
    assert np.array_equal(trace.load(6), simulate.trace(args, "zipf:1.2"))  # `simulate` sees the same trace
    expected = trace.load(6)[0]
    assert expected.sum() == pytest.approx(6) and expected.max() <= 1.0
    many = torch.randn(8192, 64, generator=torch.Generator().manual_seed(1))
    drawn = torch.bincount(trace.route(1, many, 6).reshape(-1), minlength=64).numpy() / 8192
    assert np.abs(drawn - expected).max() < 0.03
    # a held answer: time_scale x the cost model's time for the share (2 experts touched, one of them twice)
    held = sim.hold()(torch.tensor([[0, 1], [0, -1]]))
    want = 100 * worker_cost(LITE, DEVICES["H200"])(2, 3, 1)
    assert held == pytest.approx(want)


def test_a_recorded_window_routes_as_it_was_recorded(tmp_path):
    """routing "window:PATH": the live router draws each expert as often per token as the recorded window
    routed it, so a live simulated cluster and `simulate` (which reads the same file) see the same load."""
    import json

    import torch

    from moe_service.serving.simulated import Simulation

    args = simulate.model_args("tiny-64")
    # as a service records it: 1000 tokens x top-6 = 6000 pairs a layer, no expert more than once a token
    window = np.empty((2, 64))
    window[0, :4], window[0, 4:] = [900, 600, 300, 200], 4000 / 60  # layer 1: four hot experts
    window[1, :10], window[1, 10:] = 400, 2000 / 54  # layer 2: ten warm ones
    (tmp_path / "window.json").write_text(json.dumps({"load": window.tolist()}))
    trace = Simulation.from_dict({"routing": f"window:{tmp_path / 'window.json'}"}).trace(args)
    recorded = simulate.trace(args, str(tmp_path / "window.json"))
    x = torch.randn(8192, 64, generator=torch.Generator().manual_seed(2))
    for i, layer in enumerate(args.moe_layers):
        want = recorded[i] / recorded[i].sum() * 6
        drawn = torch.bincount(trace.route(layer, x, 6).reshape(-1), minlength=64).numpy() / 8192
        assert np.abs(drawn - want).max() < 0.03, (layer, np.abs(drawn - want).max())
        assert np.abs(trace.load(6)[i] - want).max() < 0.03


def test_calibration_fits_the_device_that_produced_its_timings(tmp_path):
    """`moe-service calibrate` times this CPU; its fit is checked here on timings a known device gives: reads
    then arithmetic (no overlap), the multi-row read slower than the one-row GEMV. Saved, it loads as the same
    device; timings that fall with more rows are refused."""
    from moe_service.bench.placement_bench import fit_device
    from moe_service.capacity.costmodel import load_calibration, save_calibration

    dim, inter = 1024, 704
    weights, row_flops = 3 * dim * inter * 4, 2 * 3 * dim * inter
    gemv, packed, flops = 20e9, 8e9, 50e9
    per_expert = {r: weights / (gemv if r == 1 else packed) + r * row_flops / flops for r in (1, 2, 4, 8, 16, 32, 64)}
    dev = fit_device(per_expert, 30e-6, dim, inter, threads=1)
    assert dev.memory_bandwidth == pytest.approx(gemv)
    assert dev.multi_row_bandwidth == pytest.approx(packed)
    assert dev.flops == pytest.approx(flops)
    assert (dev.call_s, dev.itemsize, dev.overlap) == (30e-6, 4, False)
    save_calibration(dev, tmp_path / "cal.json", seconds_per_expert_by_rows=per_expert)
    assert load_calibration(tmp_path / "cal.json") == dev
    with pytest.raises(RuntimeError, match="no linear cost in rows"):
        fit_device({r: 1e-3 / r for r in per_expert}, 30e-6, dim, inter, threads=1)
