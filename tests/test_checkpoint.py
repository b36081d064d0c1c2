"""Checkpoint loading: layouts, dtypes, subsets read alone, and errors that say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_service import load_model
from moe_service.checkpoint import PresetSource, SafetensorsSource, expected_shapes, load_experts, save_hf_checkpoint
from moe_service.checkpoint.names import parse_expert_name
from moe_service.model.args import ModelArgs
from tests.oracle import CONFIGS, YARN, write_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("sharded")
    hf = write_checkpoint(path, CONFIGS["qlora_grouped_scaled"], shard="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path, hf


def test_sharded_checkpoint_loads_exactly(sharded):
    path, hf = sharded
    ids = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    assert (load_model(path)(ids) - want).abs().max().item() <= 1e-4


def test_gateway_reads_no_routed_expert(sharded):
    path, _ = sharded
    src = SafetensorsSource(path)
    model = load_model(src, with_routed_experts=False)
    assert src.reads, "nothing was read"
    assert not [n for n in src.reads if parse_expert_name(n)], "the gateway read routed-expert tensors"
    assert all(layer.mlp.experts is None for layer in model.layers if layer.is_moe)
    # and everything that is not a routed expert was read
    non_expert = {n for n in expected_shapes(src.args) if not parse_expert_name(n)}
    assert set(src.reads) == non_expert


def test_worker_reads_only_its_experts(sharded):
    path, _ = sharded
    src = SafetensorsSource(path)
    pairs = [(0, 1), (2, 5), (2, 0)]
    hosted = load_experts(src, pairs)
    assert {parse_expert_name(n) for n in src.reads} == set(pairs)
    assert len(src.reads) == 3 * len(pairs)
    assert hosted[2][1] == [0, 5] and hosted[0][1] == [1]
    full = load_model(path)
    assert torch.equal(hosted[2][0].down_proj[1], full.layers[2].mlp.experts.down_proj[5])


def test_hosted_subset_computes_like_full_layer(sharded):
    path, _ = sharded
    full = load_model(path)
    layer = 1
    E = full.args.n_routed_experts
    hosted = load_experts(path, [(layer, e) for e in range(E)])
    experts, ids = hosted[layer]
    x = torch.randn(5, full.args.hidden_size)
    w, e = full.layers[layer].mlp.gate(x)
    assert torch.allclose(experts(x, w, e), full.layers[layer].mlp.experts(x, w, e), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversion_keeps_gate_fp32(sharded, dtype):
    path, _ = sharded
    model = load_model(path, dtype=dtype)
    assert model.embed_tokens.weight.dtype == dtype
    assert model.layers[0].mlp.experts.gate_up_proj.dtype == dtype
    assert model.layers[0].mlp.gate.weight.dtype == torch.float32
    ids = torch.randint(0, 257, (1, 6))
    ref = load_model(path)(ids)
    got = model(ids).float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() < 0.25  # low-precision storage, same model


def test_real_deepseek_config_layout(tmp_path):
    """DeepSeek-V2's own config.json: rope_theta and rope_scaling at the top level, 'type' not 'rope_type'."""
    path = tmp_path / "hf"
    hf = write_checkpoint(path, CONFIGS["yarn_normtopk_dense2"])
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(cfg))
    args = ModelArgs.from_hf_config(cfg)
    assert args.rope_scaling["type"] == "yarn" and args.rope_scaling["factor"] == YARN["factor"]
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        want = hf(ids).logits
    assert (load_model(path)(ids) - want).abs().max().item() <= 1e-4


def test_preset_round_trips_through_hf_directory(tmp_path):
    src = PresetSource("tiny")
    save_hf_checkpoint(src, tmp_path / "tiny", max_shard_bytes=300_000)
    assert (tmp_path / "tiny" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 512, (2, 7))
    assert torch.equal(load_model("tiny")(ids), load_model(tmp_path / "tiny")(ids))


def test_preset_subset_is_reproducible_alone():
    a = PresetSource("tiny").read("model.layers.2.mlp.experts.3.up_proj.weight")
    src = PresetSource("tiny")
    src.read("model.embed_tokens.weight")
    assert torch.equal(a, src.read("model.layers.2.mlp.experts.3.up_proj.weight"))


def test_preset_writes_a_checkpoint_transformers_loads(tmp_path):
    from transformers import DeepseekV2ForCausalLM

    save_hf_checkpoint("tiny", tmp_path / "tiny")
    hf = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        want = hf(ids).logits
    assert (load_model("tiny")(ids) - want).abs().max().item() <= 1e-4


# errors name the file or key and what was expected

def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="does not exist.*preset name"):
        load_model("/no/such/checkpoint")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'.*deepseek_v2"):
        load_model(tmp_path)


def test_unsupported_topk_method(tmp_path):
    cfg = PresetSource("tiny").args.to_hf_config() | {"topk_method": "noaux_tc"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="topk_method 'noaux_tc' is not supported"):
        load_model(tmp_path)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_checkpoint("tiny", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.self_attn.kv_b_proj.weight"):
        load_model(tmp_path)


def test_misshaped_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_checkpoint("tiny", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.mlp.experts.4.down_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"experts.4.down_proj.weight.*shape \[3, 3\].*implies \[64, 32\]"):
        load_experts(tmp_path, [(2, 4)])
    load_experts(tmp_path, [(2, 3)])  # a worker not hosting the broken expert is unaffected
