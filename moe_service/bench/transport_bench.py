"""Transport: RunExperts on loopback against a raw gRPC echo of the same bytes, in one run.

The echo server returns its request bytes unchanged (no protobuf, no tensors): the floor any
gRPC-based transport pays. RunExperts is timed end to end and with the experts' compute (which the
server reports) subtracted, so what is compared is the transport's own cost.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import torch

from moe_service.bench.common import log
from moe_service.model.experts import RoutedExperts
from moe_service.transport.expert_client import ExpertClient
from moe_service.transport.expert_server import ExpertServicer, HostedLayer, start_expert_server
from moe_service.transport.options import grpc_options

ECHO_METHOD = "/bench.Echo/Echo"


async def _start_echo(max_bytes: int) -> tuple[grpc.aio.Server, int]:
    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server(options=grpc_options(max_bytes))
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _time_pair(a, b, n: int) -> tuple[list[float], list[float]]:
    """Times `a` and `b` alternately, so both see the same machine (its speed drifts within a run)."""
    await a()  # warm-up
    await b()
    ta, tb = [], []
    for _ in range(n):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t0)
    return ta, tb


async def _run(hidden: int, experts: int, top_k: int, big_rows: int, dtype: torch.dtype, small_n: int,
               big_n: int) -> dict:
    max_bytes = 512 << 20
    inter = 64  # small experts: this measures the wire, not the matmuls
    # the experts compute in fp32 (CPU bf16 matmuls are slow and erratic, and their time is subtracted
    # anyway); activations still travel in `dtype` both ways, as the server converts at the edges
    module = RoutedExperts(experts, hidden, inter)
    torch.nn.init.normal_(module.gate_up_proj, std=0.02)
    torch.nn.init.normal_(module.down_proj, std=0.02)
    servicer = ExpertServicer({1: HostedLayer.build(module, list(range(experts)), experts)}, worker_id="bench",
                              hidden_size=hidden, num_experts=experts, slots_per_layer=experts,
                              max_message_bytes=max_bytes)
    expert_server = await start_expert_server(servicer)
    echo_server, echo_port = await _start_echo(max_bytes)
    client = ExpertClient(max_message_bytes=max_bytes)
    echo_ch = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}", options=grpc_options(max_bytes))
    echo = echo_ch.unary_unary(ECHO_METHOD)
    results = {}
    try:
        for label, rows, n in (("one_token", 1, small_n), ("large", big_rows, big_n)):
            x = torch.randn(rows, hidden).to(dtype)
            e = torch.randint(0, experts, (rows, top_k), dtype=torch.int32)
            w = torch.rand(rows, top_k)
            payload = x.numel() * x.element_size()
            blob = bytes(payload + e.numel() * 4 + w.numel() * 4)
            computes: list[float] = []

            async def run_experts():
                _, c = await client.run(expert_server.address, 1, x, e, w, timeout=60)
                computes.append(c)

            log(f"[transport bench] {label}: {rows} rows x {hidden} {str(dtype)[6:]}, {n} calls each")
            t_rpc, t_echo = await _time_pair(run_experts, lambda: echo(blob, timeout=60), n)
            rpc = statistics.median(t_rpc)
            comp = statistics.median(computes[1:])
            # per call, so a compute time that drifts (CPU bf16 kernels warm up) does not leak in
            transport = statistics.median([t - c for t, c in zip(t_rpc, computes[1:])])
            echo_s = statistics.median(t_echo)
            results[label] = {
                "rows": rows, "payload_bytes": payload,
                "run_experts_s": rpc, "compute_s": comp, "transport_s": transport, "echo_s": echo_s,
                "overhead_vs_echo": transport / echo_s,
                "throughput_GBps": 2 * payload / transport / 1e9,
                "echo_throughput_GBps": 2 * len(blob) / echo_s / 1e9,
            }
    finally:
        await echo_ch.close()
        await client.close()
        await echo_server.stop(0)
        await expert_server.stop(0)
    return results


def run(hidden: int = 1024, experts: int = 8, top_k: int = 6, big_rows: int = 4096, dtype: str = "bfloat16",
        small_n: int = 300, big_n: int = 10) -> dict:
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    # one compute thread, as an expert worker has (Ray gives zero-CPU actors one): with two, the
    # experts' parallel regions wait on a thread that gRPC's poller has preempted, and the compute
    # time (subtracted, but noisy) swings from 1 to 30 ms between runs on 2 cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = asyncio.run(_run(hidden, experts, top_k, big_rows, dt, small_n, big_n))
    finally:
        torch.set_num_threads(threads)
    return {"hidden": hidden, "dtype": dtype, **r}


def format_results(r: dict) -> str:
    s, b = r["one_token"], r["large"]
    return "\n".join([
        f"transport, hidden {r['hidden']} {r['dtype']}, loopback",
        f"one-token dispatch:   RunExperts {s['run_experts_s']*1e3:.3f} ms (compute {s['compute_s']*1e3:.3f} ms), "
        f"transport {s['transport_s']*1e3:.3f} ms vs echo {s['echo_s']*1e3:.3f} ms -> {s['overhead_vs_echo']:.2f}x the floor",
        f"{b['rows']}-row dispatch:   RunExperts {b['run_experts_s']*1e3:.1f} ms (compute {b['compute_s']*1e3:.1f} ms), "
        f"transport {b['throughput_GBps']:.2f} GB/s vs echo {b['echo_throughput_GBps']:.2f} GB/s "
        f"-> {b['throughput_GBps']/b['echo_throughput_GBps']:.0%} of the floor",
    ])
