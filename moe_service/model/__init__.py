"""DeepSeek-V2 in pure torch: no Ray, gRPC or Prometheus here."""

from moe_service.model.args import ModelArgs
from moe_service.model.cache import PagedLatentCache
from moe_service.model.experts import RoutedExperts
from moe_service.model.gate import Gate
from moe_service.model.moe import Dispatcher, MoE, Pending
from moe_service.model.presets import PRESETS, preset_args
from moe_service.model.transformer import Transformer

__all__ = [
    "ModelArgs", "PagedLatentCache", "RoutedExperts", "Gate", "Dispatcher", "Pending", "MoE", "PRESETS", "preset_args",
    "Transformer",
]
