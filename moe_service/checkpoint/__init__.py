"""Hugging Face DeepSeek-V2 checkpoints: names, sources, lazy per-tensor loading."""

from moe_service.checkpoint.loader import load_experts, load_model, save_hf_checkpoint
from moe_service.checkpoint.names import EXPERT_TABLE, NAME_TABLE, expected_shapes
from moe_service.checkpoint.sources import PresetSource, SafetensorsSource, TensorSource, open_source

__all__ = [
    "load_model", "load_experts", "save_hf_checkpoint", "open_source", "TensorSource",
    "SafetensorsSource", "PresetSource", "NAME_TABLE", "EXPERT_TABLE", "expected_shapes",
]
