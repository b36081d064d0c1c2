"""moe-service: distributed serving of DeepSeek-V2-style Mixture-of-Experts models."""

from moe_service.checkpoint import load_model

__all__ = ["Client", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the client pulls in gRPC; importing the model alone should not
    if name == "Client":
        from moe_service.client import Client

        return Client
    raise AttributeError(f"module 'moe_service' has no attribute {name!r}")
