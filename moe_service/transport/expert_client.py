"""The gateway's async client for expert workers, and the remote-expert backend built on it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc
import torch

from moe_service.scheduler import StepDeadline
from moe_service.routing import LayerRoutes, NoReplicaError, WorkerDispatch, combine, plan_dispatch
from moe_service.transport import fastwire
from moe_service.transport.options import DEFAULT_MAX_MESSAGE_BYTES, TLSConfig, grpc_options
from moe_service.transport.pb import moe_pb2, moe_pb2_grpc

class ExpertClient:
    """One channel per worker address, reused; calls are plain unary RPCs with deadlines."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: TLSConfig | None = None) -> None:
        self.max_message_bytes, self.tls = max_message_bytes, tls
        self._stubs: dict[str, moe_pb2_grpc.ExpertStub] = {}
        self._run: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> moe_pb2_grpc.ExpertStub:
        if address not in self._stubs:
            opts = grpc_options(self.max_message_bytes)
            if self.tls:
                ch = grpc.aio.secure_channel(address, self.tls.channel_credentials(), opts + self.tls.channel_options())
            else:
                ch = grpc.aio.insecure_channel(address, options=opts)
            self._channels[address] = ch
            self._stubs[address] = moe_pb2_grpc.ExpertStub(ch)
            # the hot call skips protobuf's copies (fastwire writes the same bytes), and is decoded
            # in run(), which knows the output's shape
            self._run[address] = ch.unary_unary("/moe.v1.Expert/RunExperts", request_serializer=None,
                                                response_deserializer=None)
        return self._stubs[address]

    async def run(self, address: str, layer: int, hidden: torch.Tensor, experts: torch.Tensor,
                  weights: torch.Tensor, timeout: float | None = None, rows: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, float]:
        """hidden [N, D] (or [T, D] and the N `rows` of it to send), experts [N, K], weights [N, K]
        -> (output [N, D], the worker's compute seconds)"""
        self.stub(address)
        payload = fastwire.encode_request(layer, hidden, experts, weights, rows)
        expect = (hidden.dtype, (experts.shape[0], hidden.shape[1]))
        return fastwire.decode_response(await self._run[address](payload, timeout=timeout), expect)

    async def describe(self, address: str, timeout: float | None = 5.0) -> moe_pb2.DescribeResponse:
        return await self.stub(address).Describe(moe_pb2.DescribeRequest(), timeout=timeout)

    async def forget(self, address: str) -> None:
        """Close the channel of a worker that went away."""
        self._stubs.pop(address, None)
        self._run.pop(address, None)
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        for address in list(self._channels):
            await self.forget(address)


@dataclass
class CallStats:
    """Per-call facts the gateway turns into metrics."""

    worker: int
    layer: int
    rows: int
    seconds: float
    compute_seconds: float
    bytes_sent: int
    bytes_received: int
    ok: bool
    retried: bool = False


@dataclass
class RoutingTable:
    """A placement version as the gateway uses it: per-layer routes and each worker's address."""

    version: int
    routes: dict[int, LayerRoutes]  # layer -> routes
    addresses: dict[int, str]  # worker id -> host:port


# a worker that answers with one of these cannot serve this call: its pairs go to another replica
# (UNAVAILABLE: gone; DEADLINE_EXCEEDED: hung past one call's timeout; FAILED_PRECONDITION: it no
# longer hosts an expert, the placement moved on; CANCELLED: it is shutting down)
WORKER_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.CANCELLED)


@dataclass
class RemoteExperts:
    """Runs one layer's routed experts on the workers: plan, call all concurrently, combine.

    A worker that cannot serve a call (WORKER_LOST) is excluded and only its pairs are planned
    again, onto other replicas; with none left, a newer table (the controller restarting the
    worker) is awaited for a while, then the same one is tried again. This goes on until the step's
    deadline, which is its requests' (see docs/architecture.md), and only then fails the step.
    """

    client: ExpertClient
    table: RoutingTable
    call_timeout_s: float = 30.0
    on_call: Callable[[CallStats], None] | None = None
    # ("dispatch" | "experts" | "wire" | "combine", seconds); wire = experts beyond the slowest worker's compute
    on_stage: Callable[[str, float], None] | None = None
    # (excluded workers, the table's version, seconds) -> a newer table, or None if none came in time
    wait_for_table: Callable[[set[int], int, float], Awaitable[RoutingTable | None]] | None = None
    table_wait_s: float = 2.0  # how long one wait for a newer table lasts before the old one is tried again

    async def run(self, layer: int, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                  deadline: float | None = None) -> torch.Tensor:
        """x [T, D], weights [T, K], experts [T, K] -> [T, D]"""
        table = self.table
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        pending = experts  # [T, K]: the pairs still to be answered, -1 elsewhere
        excluded: set[int] = set()
        retried = False
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                raise StepDeadline(f"layer {layer}: the step's deadline passed before the experts answered")
            t0 = time.perf_counter()
            try:
                plan = plan_dispatch(pending, weights, table.routes[layer].without(excluded))
            except NoReplicaError:
                table = await self._newer_table(table, excluded, deadline)
                excluded = set()
                continue
            calls = [self._call(table, layer, d, x, deadline, retried) for d in plan]
            t1 = time.perf_counter()
            results = await asyncio.gather(*calls, return_exceptions=True)
            t2 = time.perf_counter()
            lost = torch.zeros(experts.shape, dtype=torch.bool)
            slowest = 0.0  # the slowest worker's own compute: the rest of the stage is the wire's
            for d, r in zip(plan, results):
                if isinstance(r, grpc.aio.AioRpcError) and r.code() in WORKER_LOST:
                    excluded.add(d.worker)
                    lost[d.rows] |= d.experts >= 0
                elif isinstance(r, BaseException):
                    raise r
                else:
                    parts.append((d.rows, r[0]))
                    slowest = max(slowest, r[1])
            if self.on_stage is not None:
                self.on_stage("dispatch", t1 - t0)
                self.on_stage("experts", t2 - t1)
                self.on_stage("wire", max(0.0, t2 - t1 - slowest))
            if not bool(lost.any()):
                out = combine(x.shape[0], parts, x)
                if self.on_stage is not None:
                    self.on_stage("combine", time.perf_counter() - t2)
                return out
            pending = torch.where(lost, experts, -1)  # only the lost workers' pairs, padding stays padding
            retried = True

    async def _newer_table(self, table: RoutingTable, excluded: set[int], deadline: float | None) -> RoutingTable:
        """A newer table for this call (the gateway's own switches between steps), or the same one
        once a wait runs out: an excluded worker may have been a passing failure."""
        wait = self.table_wait_s if deadline is None else max(0.0, min(self.table_wait_s, deadline - time.monotonic()))
        if self.wait_for_table is None:  # nobody to ask: back off, then try the same table again
            await asyncio.sleep(wait)
            return table
        newer = await self.wait_for_table(excluded, table.version, wait)
        return newer if newer is not None and newer.version > table.version else table

    async def _call(self, table: RoutingTable, layer: int, d: WorkerDispatch, x: torch.Tensor,
                    deadline: float | None, retried: bool) -> tuple[torch.Tensor, float]:
        """Sends x[d.rows] [N, D] (gathered into the message) with d's experts and weights."""
        rows = d.rows
        timeout = self.call_timeout_s
        if deadline is not None:
            timeout = min(timeout, max(0.001, deadline - time.monotonic()))
        t0 = time.perf_counter()
        ok, compute, out = False, 0.0, None
        try:
            out, compute = await self.client.run(table.addresses[d.worker], layer, x, d.experts, d.weights, timeout, rows)
            ok = True
            return out, compute
        finally:
            if self.on_call is not None:
                sent = rows.numel() * x.shape[1] * x.element_size() + d.experts.numel() * 8
                self.on_call(CallStats(d.worker, layer, int(d.rows.numel()), time.perf_counter() - t0, compute,
                                       sent, out.numel() * out.element_size() if out is not None else 0, ok, retried))
