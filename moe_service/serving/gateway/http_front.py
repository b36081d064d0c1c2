"""The OpenAI HTTP API beside the gateway, not in front of it: a Serve deployment of its own that runs its own
uvicorn server on the service's HTTP port and calls the gateway through a deployment handle. gRPC requests
reach the gateway through Serve's gRPC proxy and never pass an ASGI wrapper (docs/api.md, "Two APIs")."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from grpc_health.v1 import health_pb2
from ray import serve

from moe_service.checkpoint import open_source
from moe_service.engine.tokenizer import load_tokenizer
from moe_service.serving.config import APP_NAME, GATEWAY_NAME, ServiceConfig
from moe_service.serving.gateway.http_api import build_http_app
from moe_service.serving.gateway.requests import check_auth
from moe_service.transport.pb import moe_pb2

START_TIMEOUT_S = 60.0


class RemoteGateway:
    """The gateway as the HTTP API reaches it: through a handle, its answers coalesced on the way (one
    handle message per batch of ready tokens, split back into tokens here)."""

    def __init__(self, handle, cfg: ServiceConfig) -> None:
        self.handle, self.model = handle, cfg.model
        args = open_source(cfg.model).args
        self.tokenizer = load_tokenizer(cfg.model, args)
        self.limits = cfg.scheduler_config().fit(args)
        self.api_key = cfg.resolved_api_key()

    def check_auth(self, metadata: list[tuple[str, str]]) -> None:
        check_auth(metadata, self.api_key)

    async def generate(self, request: moe_pb2.GenerateRequest, method: str, workload: str | None,
                       interval: int = 1) -> AsyncIterator[moe_pb2.GenerateResponse]:
        """`interval`: the gateway's stream_interval on the way (1: what is ready; a whole answer awaited at
        once can take many tokens per message at no cost in latency)."""
        request.stream_interval = interval
        stream = self.handle.options(stream=True).http_generate.remote(request, method, workload)
        try:
            async for resp in stream:
                for tok in resp.tokens:  # per token again: the OpenAI API's chunks are
                    out = moe_pb2.GenerateResponse(token_id=tok.token_id, text=tok.text, index=resp.index,
                                                   request_id=resp.request_id, top_logprobs=tok.top_logprobs)
                    if tok.HasField("logprob"):
                        out.logprob = tok.logprob
                    yield out
                if resp.finish_reason:
                    yield resp
        finally:
            stream.cancel()  # the client went away, or a sample failed: the gateway frees its sequences

    async def serving(self) -> bool:
        r = await self.handle.Check.remote(health_pb2.HealthCheckRequest())
        return r.status == health_pb2.HealthCheckResponse.SERVING


class HTTPFront:
    async def __init__(self, config: dict[str, Any]) -> None:
        import uvicorn

        cfg = ServiceConfig.from_dict(config)
        handle = serve.get_deployment_handle(GATEWAY_NAME, APP_NAME)
        app = build_http_app(await asyncio.to_thread(RemoteGateway, handle, cfg), cfg.model_name())
        self.server = uvicorn.Server(uvicorn.Config(app, host=cfg.http_host, port=cfg.http_port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:  # polling the server's own flag: it has no event to wait on
            if self.task.done():
                raise RuntimeError(f"the HTTP front could not listen on {cfg.http_host}:{cfg.http_port}: "
                                   f"{self.task.exception() or 'the server stopped'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the HTTP front did not start within {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.05)

    def check_health(self) -> None:
        if self.task.done():
            raise RuntimeError("the HTTP front's server stopped")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.should_exit = True
