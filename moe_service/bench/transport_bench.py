"""Transport: RunExperts on loopback against a raw gRPC echo of the same bytes, in one run.

The echo server returns its request bytes unchanged (no protobuf, no tensors): the floor any
gRPC-based transport pays. RunExperts is timed end to end and with the experts' compute (which the
server reports) subtracted, so what is compared is the transport's own cost. Both unary calls and
the gateway's data path (one message on a persistent stream, written and read by the calling
thread on its own loop) are measured, each against the echo of its own kind.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Callable

import grpc
import torch

from moe_service.bench.common import log
from moe_service.model.experts import RoutedExperts
from moe_service.transport import fastwire
from moe_service.transport.expert_client import ExpertClient, ExpertStreams
from moe_service.serving.worker.servicer import ExpertServicer, HostedLayer
from moe_service.transport.server import start_expert_server
from moe_service.transport.memory import keep_large_buffers
from moe_service.transport.options import grpc_options

ECHO_METHOD = "/bench.Echo/Echo"
ECHO_STREAM = "/bench.Echo/Stream"


async def _start_echo(max_bytes: int) -> tuple[grpc.aio.Server, int]:
    async def echo(request: bytes, context) -> bytes:
        return request

    async def stream(requests, context):
        async for request in requests:
            yield request

    server = grpc.aio.server(options=grpc_options(max_bytes))
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo),
                       "Stream": grpc.stream_stream_rpc_method_handler(stream)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class StreamEcho:
    """The floor of the gateway's data path: raw bytes echoed on one persistent stream per server,
    driven as ExpertStreams drives its streams (this thread's own loop; write to every stream, then
    read every answer)."""

    def __init__(self, ports: list[int], max_bytes: int = 64 << 20) -> None:
        self.loop = asyncio.new_event_loop()
        self.channels, self.calls = self.loop.run_until_complete(self._open(ports, max_bytes))

    @staticmethod
    async def _open(ports: list[int], max_bytes: int) -> tuple[list, list]:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}", options=grpc_options(max_bytes)) for p in ports]
        return channels, [ch.stream_stream(ECHO_STREAM)() for ch in channels]

    def round_trip(self, blob: bytes) -> None:
        self.loop.run_until_complete(self._gather(*(c.write(blob) for c in self.calls)))
        self.loop.run_until_complete(self._gather(*(c.read() for c in self.calls)))

    @staticmethod
    async def _gather(*aws) -> list:
        return await (aws[0] if len(aws) == 1 else asyncio.gather(*aws))

    def close(self) -> None:
        async def close() -> None:
            for c in self.calls:
                c.cancel()
            await asyncio.gather(*(c.code() for c in self.calls))  # let each call see its end
            for ch in self.channels:
                await ch.close()

        self.loop.run_until_complete(close())
        self.loop.close()


def alternating(call: Callable[[], float], echo: StreamEcho, blob: bytes, n: int, warmup: int
                ) -> tuple[list[float], list[float], list[float]]:
    """`n` rounds after `warmup`, each a call (which returns the worker's compute seconds) then an echo of
    `blob`: (the calls' round trips, their compute seconds, the echoes' round trips)."""
    rtts, computes, floors = [], [], []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        c = call()
        t1 = time.perf_counter()
        echo.round_trip(blob)
        t2 = time.perf_counter()
        if i >= warmup:
            rtts.append(t1 - t0)
            computes.append(c)
            floors.append(t2 - t1)
    return rtts, computes, floors


def _stream_one_token(address: str, echo_port: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype,
                      n: int) -> dict:
    """One token's RunExperts on a persistent stream (ExpertStreams, as the gateway sends it) against
    a stream echo of the same bytes, alternating."""
    streams, echo = ExpertStreams(MAX_BYTES), StreamEcho([echo_port], MAX_BYTES)
    x = torch.randn(1, hidden).to(dtype)
    e = torch.randint(0, experts, (1, top_k), dtype=torch.int32)
    w = torch.rand(1, top_k)
    blob = fastwire.encode_request(1, x, e, w, seq=1, deadline_s=60.0)

    def run_experts() -> float:
        seq = streams.next_seq()
        payload = fastwire.encode_request(1, x, e, w, seq=seq, deadline_s=60.0)
        deadline = time.monotonic() + 60
        answer = streams.receive(streams.send([(address, payload, seq, (dtype, (1, hidden)))], deadline))[0]
        return answer.compute_seconds

    try:
        rpc, comp, floor = alternating(run_experts, echo, blob, n, warmup=20)
    finally:
        streams.close()
        echo.close()
    transport = statistics.median([t - c for t, c in zip(rpc, comp)])
    echo_s = statistics.median(floor)
    return {"rows": 1, "payload_bytes": x.nbytes, "run_experts_s": statistics.median(rpc),
            "compute_s": statistics.median(comp), "transport_s": transport, "echo_s": echo_s,
            "overhead_vs_echo": transport / echo_s}


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


MAX_BYTES = 512 << 20
WHERE = {"separate_process": "a separate process", "same_process": "the client's process"}
INTER = 64  # small experts: this measures the wire, not the matmuls


async def _start_servers(hidden: int, experts: int) -> tuple[list, str, int]:
    """The expert server and the echo server side by side, as in an expert worker's process."""
    # the experts compute in fp32 (CPU bf16 matmuls are slow and erratic, and their time is subtracted
    # anyway); activations still travel in `dtype` both ways, as the server converts at the edges
    module = RoutedExperts(experts, hidden, INTER)
    torch.nn.init.normal_(module.gate_up_proj, std=0.02)
    torch.nn.init.normal_(module.down_proj, std=0.02)
    servicer = ExpertServicer({1: HostedLayer.build(module, list(range(experts)), experts)}, worker_id="bench",
                              hidden_size=hidden, num_experts=experts,
                              max_message_bytes=MAX_BYTES)
    expert_server = await start_expert_server(servicer)
    echo_server, echo_port = await _start_echo(MAX_BYTES)
    return [expert_server, echo_server], expert_server.address, echo_port


def _server_process(queue, hidden: int, experts: int) -> None:
    torch.set_num_threads(1)  # as an expert worker has
    keep_large_buffers()  # as an expert worker does

    async def main() -> None:
        _, address, echo_port = await _start_servers(hidden, experts)
        queue.put((address, echo_port))
        await asyncio.Event().wait()  # until the parent terminates this process

    asyncio.run(main())


async def _run(hidden: int, experts: int, top_k: int, big_rows: int, dtype: torch.dtype, small_n: int,
               big_n: int, servers: "tuple[str, int] | None") -> dict:
    """`servers`: the (expert address, echo port) of a server process, or None to serve in this one."""
    owned = []
    if servers is None:
        owned, address, echo_port = await _start_servers(hidden, experts)
    else:
        address, echo_port = servers
    client = ExpertClient(max_message_bytes=MAX_BYTES)
    echo_ch = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}", options=grpc_options(MAX_BYTES))
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
                _, c = await client.run(address, 1, x, e, w, timeout=60)
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
        for server in owned:
            await server.stop(0)
    return results


def run(hidden: int = 1024, experts: int = 8, top_k: int = 6, big_rows: int = 4096, dtype: str = "bfloat16",
        small_n: int = 300, big_n: int = 20) -> dict:
    """Both setups in one run: servers in a separate process (as the gateway calls an expert
    worker) and in the client's own process (one event loop, one GIL for both ends)."""
    import multiprocessing

    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    # one compute thread, as an expert worker has (Ray gives zero-CPU actors one): with two, the
    # experts' parallel regions wait on a thread that gRPC's poller has preempted, and the compute
    # time (subtracted, but noisy) swings from 1 to 30 ms between runs on 2 cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    keep_large_buffers()  # as the gateway does; the echo gets the same allocator
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_server_process, args=(queue, hidden, experts), daemon=True)
    proc.start()
    out = {"hidden": hidden, "dtype": dtype}
    try:
        servers = queue.get(timeout=120)
        for setup, where in (("separate_process", servers), ("same_process", None)):
            log(f"[transport bench] servers in {WHERE[setup]}")
            out[setup] = asyncio.run(_run(hidden, experts, top_k, big_rows, dt, small_n, big_n, where))
        log(f"[transport bench] the gateway's data path: one token on a persistent stream, {small_n} calls each")
        out["stream_one_token"] = _stream_one_token(*servers, hidden, experts, top_k, dt, small_n)
    finally:
        proc.terminate()
        proc.join(10)
        torch.set_num_threads(threads)
    return out


def format_results(r: dict) -> str:
    lines = [f"transport, hidden {r['hidden']} {r['dtype']}, loopback"]
    for setup in ("separate_process", "same_process"):
        s, b = r[setup]["one_token"], r[setup]["large"]
        lines += [
            f"servers in {WHERE[setup]}:",
            f"  one-token dispatch:   RunExperts {s['run_experts_s']*1e3:.3f} ms (compute {s['compute_s']*1e3:.3f} ms), "
            f"transport {s['transport_s']*1e3:.3f} ms vs echo {s['echo_s']*1e3:.3f} ms -> {s['overhead_vs_echo']:.2f}x the floor",
            f"  {b['rows']}-row dispatch:   RunExperts {b['run_experts_s']*1e3:.1f} ms (compute {b['compute_s']*1e3:.1f} ms), "
            f"transport {b['throughput_GBps']:.2f} GB/s vs echo {b['echo_throughput_GBps']:.2f} GB/s "
            f"-> {b['throughput_GBps']/b['echo_throughput_GBps']:.0%} of the floor",
        ]
    s = r["stream_one_token"]
    lines += [
        "on a persistent stream (the gateway's data path), servers in a separate process:",
        f"  one-token dispatch:   RunExpertsStream {s['run_experts_s']*1e3:.3f} ms (compute {s['compute_s']*1e3:.3f} ms), "
        f"transport {s['transport_s']*1e3:.3f} ms vs stream echo {s['echo_s']*1e3:.3f} ms -> "
        f"{s['overhead_vs_echo']:.2f}x the floor",
    ]
    return "\n".join(lines)
