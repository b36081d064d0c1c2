"""The wire: protobuf codec, the expert worker's gRPC server, the gateway's async client."""
