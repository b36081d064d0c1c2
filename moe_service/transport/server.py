"""The expert workers' gRPC server: moe.v1.Expert (RunExperts and RunExpertsStream read and written with
fastwire, Describe as generated), health and reflection, on the first free port of a range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from moe_service.transport import fastwire
from moe_service.transport.options import TLSConfig, grpc_options
from moe_service.transport.pb import moe_pb2

EXPERT_SERVICE = "moe.v1.Expert"


def expert_handlers(servicer: Any) -> grpc.GenericRpcHandler:
    """moe.v1.Expert's methods of `servicer` (RunExperts, RunExpertsStream, Describe)."""
    return grpc.method_handlers_generic_handler(EXPERT_SERVICE, {
        "RunExperts": grpc.unary_unary_rpc_method_handler(
            servicer.RunExperts, request_deserializer=fastwire.decode_request, response_serializer=None),
        "RunExpertsStream": grpc.stream_stream_rpc_method_handler(
            servicer.RunExpertsStream, request_deserializer=fastwire.decode_request, response_serializer=None),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe, request_deserializer=moe_pb2.DescribeRequest.FromString,
            response_serializer=moe_pb2.DescribeResponse.SerializeToString),
    })


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer
    servicer: Any

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", EXPERT_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)


async def start_expert_server(servicer: Any, host: str = "127.0.0.1", ports: tuple[int, int] | None = None,
                              tls: TLSConfig | None = None) -> RunningServer:
    """Starts the server on the first free port of `ports` (inclusive), or any free port, and marks it
    SERVING."""
    from grpc_health.v1 import health, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.aio.server(options=grpc_options(servicer.max_message_bytes))
    server.add_generic_rpc_handlers((expert_handlers(servicer),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (moe_pb2.DESCRIPTOR.services_by_name["Expert"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = 0
    for port in range(ports[0], ports[1] + 1) if ports else (0,):
        addr = f"{host}:{port}"
        try:
            bound = server.add_secure_port(addr, tls.server_credentials()) if tls else server.add_insecure_port(addr)
        except RuntimeError:  # taken (newer gRPC raises, older returns 0)
            bound = 0
        if bound:
            break
    if not bound:
        raise OSError(f"no free port for the expert server in {ports} on {host}")
    await server.start()
    running = RunningServer(server, bound, health_servicer, servicer)
    await running.set_serving(True)
    return running
