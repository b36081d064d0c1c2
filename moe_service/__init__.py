"""moe-service: distributed serving of DeepSeek-V2-style Mixture-of-Experts models."""

from moe_service.checkpoint import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"
