"""moe.v1.Inference as Serve's gRPC proxy registers it (`grpc_servicer_functions`): the generated methods,
except that a request whose bytes do not parse reaches the gateway as `Unparsed`, which it answers with
INVALID_ARGUMENT, instead of failing in the proxy's deserializer, which gRPC reports as UNKNOWN."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from moe_service.transport.pb import moe_pb2

SERVICE = "moe.v1.Inference"


@dataclass(frozen=True)
class Unparsed:
    """A request that is not the message it was sent as: what it should have been, and why it is not."""

    message: str
    error: str


def _parser(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return Unparsed(message_class.DESCRIPTOR.full_name, str(e) or "malformed protobuf")

    return parse


def add_InferenceServicer_to_server(servicer, server) -> None:  # noqa: N802 - the name Serve's option expects
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_parser(moe_pb2.GenerateRequest),
            response_serializer=moe_pb2.GenerateResponse.SerializeToString),
        "Forward": grpc.unary_unary_rpc_method_handler(
            servicer.Forward, request_deserializer=_parser(moe_pb2.ForwardRequest),
            response_serializer=moe_pb2.ForwardResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo, request_deserializer=_parser(moe_pb2.ModelInfoRequest),
            response_serializer=moe_pb2.ModelInfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
