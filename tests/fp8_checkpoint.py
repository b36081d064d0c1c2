"""FP8 block-format checkpoints for the tests, made the way DeepSeek-V3's are: every linear weight but the
router's and the LM head's as float8_e4m3fn with float32 `weight_scale_inv` per 128 x 128 block, and
`quantization_config` in config.json. Beside each, its oracle: transformers on the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe_service.model.fp8 import dequantize, quantize
from tests.oracle import hf_model

QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
NOT_QUANTIZED = ("embed_tokens", "norm", "layernorm", "mlp.gate.weight", "lm_head")


def quantized(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.dim() == 2 and not any(s in name for s in NOT_QUANTIZED)


def write_fp8_checkpoint(path: Path, overrides: dict, seed: int = 0, family: str = "v3"):
    """Writes `path/fp8` (the FP8 checkpoint) and `path/dense` (the same weights dequantized, float32);
    returns transformers' model loaded from the dense one: the oracle."""
    from transformers import AutoModelForCausalLM

    hf = hf_model(overrides, seed, family)
    hf.save_pretrained(path / "orig")
    tensors = {}
    for f in sorted((path / "orig").glob("*.safetensors")):
        tensors.update(load_file(f))
    config = json.loads((path / "orig" / "config.json").read_text())
    fp8, dense = {}, {}
    for name, t in tensors.items():
        if quantized(name, t):
            q, s = quantize(t)
            fp8[name], fp8[name + "_scale_inv"], dense[name] = q, s, dequantize(q, s)
        else:
            fp8[name] = dense[name] = t.contiguous()
    for kind, weights, cfg in (("fp8", fp8, {**config, "quantization_config": QUANTIZATION}), ("dense", dense, config)):
        (path / kind).mkdir(parents=True, exist_ok=True)
        save_file(weights, path / kind / "model.safetensors", metadata={"format": "pt"})
        (path / kind / "config.json").write_text(json.dumps(cfg, indent=2))
    oracle = AutoModelForCausalLM.from_pretrained(path / "dense", torch_dtype=torch.float32).eval()
    return oracle
