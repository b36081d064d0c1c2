"""The gateway as Serve runs it: the application's ingress, moe.v1.Inference and grpc.health.v1.Health as
Serve's gRPC proxy calls them, with no ASGI wrapper. The OpenAI HTTP API runs beside it, in the HTTP front
(http_front.py), which calls `http_generate` and `Check` through a deployment handle."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc

from moe_service.serving.control.actor import get_or_create_controller
from moe_service.serving.gateway.gateway import Gateway
from moe_service.serving.gateway.grpc_api import Unparsed
from moe_service.serving.gateway.requests import GatewayError
from moe_service.serving.gateway.table import ControllerLink
from moe_service.serving.metrics import quantile
from moe_service.transport.memory import process_memory


def controller_link(handle) -> ControllerLink:
    async def table():
        return await handle.table.remote()

    async def wait_for_table(version: int, timeout_s: float):
        return await handle.wait_for_table.remote(version, timeout_s)

    async def report_unavailable(worker: int):
        await handle.report_unavailable.remote(worker)

    async def report_load(gateway: str, counts: list, version: int, metrics_address: str | None):
        await handle.report_load.remote(gateway, counts, version, metrics_address)

    return ControllerLink(table, wait_for_table, report_unavailable, report_load)


def _time_remaining(grpc_context) -> float | None:
    """The client's deadline, as seconds from now (None: it set none)."""
    if grpc_context is not None and getattr(grpc_context, "time_remaining", None):
        return grpc_context.time_remaining()
    return None


def _fail(grpc_context, e: GatewayError):
    if grpc_context is not None:
        grpc_context.set_code(e.code)
        grpc_context.set_details(e.message)
        if e.retry_after_ms is not None:
            grpc_context.set_trailing_metadata([("grpc-retry-pushback-ms", str(e.retry_after_ms))])
    raise e


def _parsed(request):
    """A request Serve's proxy could not parse (grpc_api.Unparsed): INVALID_ARGUMENT, naming what it should be."""
    if isinstance(request, Unparsed):
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the request does not parse as {request.message}: {request.error}")
    return request


class GatewayDeployment:
    async def __init__(self, config: dict[str, Any], http_front=None) -> None:
        # `http_front`: the HTTP front's handle, only so that the application deploys it; it calls us
        # blocking work (Ray calls, loading the model) on a thread; the control tasks on this loop
        controller = await asyncio.to_thread(get_or_create_controller, config)
        self.gateway = await asyncio.to_thread(Gateway, config, controller_link(controller))
        await self.gateway.start()
        self.api = self.gateway.api

    def _auth(self, grpc_context) -> None:
        if grpc_context is not None:
            self.api.check_auth(list(grpc_context.invocation_metadata()))

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.gateway.metrics.requests.labels(method, code.name).inc()

    async def Generate(self, request, grpc_context=None):
        try:
            try:
                self._auth(grpc_context)
                request = _parsed(request)
            except GatewayError as e:
                self._count("Generate", e.code)
                raise
            workload = dict(grpc_context.invocation_metadata()).get("x-moe-workload") if grpc_context else None
            async for resp in self.api.generate(request, _time_remaining(grpc_context), workload=workload):
                yield resp
        except GatewayError as e:
            _fail(grpc_context, e)

    async def http_generate(self, request, method: str, workload: str | None):
        """Generate for the HTTP front (a handle call; the front checked the API key)."""
        async for resp in self.api.generate(request, None, method=method, workload=workload):
            yield resp

    async def Forward(self, request, grpc_context=None):
        try:
            self._auth(grpc_context)
            resp = await self.api.forward(_parsed(request), _time_remaining(grpc_context))
            self._count("Forward", grpc.StatusCode.OK)
            return resp
        except GatewayError as e:
            self._count("Forward", e.code)
            _fail(grpc_context, e)

    async def ModelInfo(self, request, grpc_context=None):
        try:
            self._auth(grpc_context)
            _parsed(request)
            self._count("ModelInfo", grpc.StatusCode.OK)
            return self.api.model_info()
        except GatewayError as e:
            self._count("ModelInfo", e.code)
            _fail(grpc_context, e)

    # grpc.health.v1.Health: what Kubernetes gRPC probes and load balancers call (no auth)
    async def Check(self, request, grpc_context=None):
        return self.gateway.health()

    async def Watch(self, request, grpc_context=None):
        async for resp in self.gateway.watch():
            yield resp

    def debug_reads(self) -> list[str]:
        """The checkpoint tensors this replica read (it must never read a routed expert)."""
        return self.gateway.source_reads

    def debug_state(self) -> dict:
        """Engine occupancy and this process's resident memory (the load test checks both return to idle)."""
        import ray

        rss = process_memory()["VmRSS"]
        m = self.gateway.metrics
        return {**self.gateway.engine.stats(), "pid": os.getpid(), "rss_bytes": rss,
                "rejection_p99_s": quantile(m.rejection, 0.99), "loop_lag_p99_s": quantile(m.loop_lag, 0.99),
                "rejected": sum(s.value for s in m.rejected.collect()[0].samples if s.name.endswith("_total")),
                "expert_streams": sorted(self.gateway.remote.open_addresses()), "device": str(self.gateway.device),
                "node_id": ray.get_runtime_context().get_node_id()}

    def record_routing_stats(self) -> dict:
        """What the cache-aware router (router.py) reads every few seconds: the prefixes this replica holds."""
        from moe_service.serving.gateway.router import short

        engine = self.gateway.engine
        s = engine.stats()
        return {"prefixes": [short(k) for k in engine.scheduler.pool.held_keys()],
                "in_flight": s["running"] + s["waiting"]}

    def check_health(self) -> None:
        # Serve's own replica health check: a dead engine thread restarts the replica
        if not self.gateway.engine_loop.thread.is_alive():
            raise RuntimeError("the engine thread died")

    def __del__(self) -> None:
        gw = getattr(self, "gateway", None)
        if gw is not None:
            gw.close()
