"""FP8 block weights (DeepSeek-V3's format): the block math, an FP8 V3 checkpoint against transformers on
the dequantized weights, experts kept in FP8 on a worker, and checkpoints that must be refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_service import load_model
from moe_service.checkpoint import SafetensorsSource, load_experts
from moe_service.model.experts import RoutedExperts
from moe_service.model.fp8 import FP8, FP8Experts, dequantize, quantize, scale_grid
from tests.fp8_checkpoint import write_fp8_checkpoint

# hidden 160 and expert width 144: whole 128 x 128 blocks and partial ones at every edge
FP8_CONFIG = dict(hidden_size=160, moe_intermediate_size=144, intermediate_size=200, qk_nope_head_dim=16,
                  v_head_dim=16, kv_lora_rank=32, q_lora_rank=48)


@pytest.mark.parametrize("shape", [(128, 128), (300, 200), (100, 60), (257, 129)])
def test_blocks_dequantize_exactly_and_scale_each_block_to_its_max(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 0.1
    q, s = quantize(w)
    assert q.dtype == FP8 and s.shape == scale_grid(shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    R, C = shape
    full = s.repeat_interleave(128, 0)[:R].repeat_interleave(128, 1)[:, :C]
    assert torch.equal(dequantize(q, s), q.float() * full)  # one rounding: value x scale, in float32
    assert torch.equal(dequantize(q, s, torch.empty(shape, dtype=torch.bfloat16)), (q.float() * full).bfloat16())
    # each block's largest magnitude maps to e4m3's largest value, so the error is a few percent at most
    assert ((dequantize(q, s) - w).abs() <= 0.07 * w.abs().max()).all()
    assert q.float().abs().max() == 448.0


@pytest.fixture(scope="module")
def fp8_v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    oracle = write_fp8_checkpoint(path, FP8_CONFIG)
    return path, oracle


def test_an_fp8_v3_checkpoint_matches_transformers_on_its_dequantized_weights(fp8_v3):
    path, oracle = fp8_v3
    assert SafetensorsSource(path / "fp8").fp8
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = oracle(ids).logits
    got = load_model(path / "fp8")(ids)  # in-process: every FP8 weight dequantized at load
    assert (got - want).abs().max().item() <= 1e-4


def test_workers_keep_routed_experts_in_fp8_and_compute_as_the_dequantized_ones(fp8_v3):
    path, _ = fp8_v3
    dense = load_model(path / "fp8")
    layer = dense.args.moe_layers[0]
    pairs = [(layer, e) for e in (3, 0, 9, 14)]
    (module, ids), = load_experts(path / "fp8", pairs).values()
    assert isinstance(module, FP8Experts) and ids == [0, 3, 9, 14]
    assert module.gate_up_proj.dtype == module.down_proj.dtype == FP8
    assert module.gate_up_scale.shape == (4, 2, 2, 2) and module.down_scale.shape == (4, 2, 2)
    dense_bytes = 3 * 160 * 144 * 4 * 4  # the same four experts in float32
    assert sum(p.numel() * p.element_size() for p in module.parameters()) < 0.3 * dense_bytes
    x = torch.randn(6, 160)
    w = torch.rand(6, 2)
    local = torch.tensor([[0, 1], [1, 2], [3, 0], [2, -1], [3, 1], [0, 2]])
    full = dense.layers[layer].mlp.experts
    want = full(x, w, torch.tensor(ids)[local.clamp(min=0)].masked_fill(local < 0, -1))
    assert (module(x, w, local) - want).abs().max().item() <= 1e-5
    # a rebalance keeps what a worker already holds: the FP8 values and their scales are copied, not re-read
    src = SafetensorsSource(path / "fp8")
    (again, _), = load_experts(src, [(layer, 3), (layer, 5)], kept={layer: (module, ids)}).values()
    assert torch.equal(again.gate_up_proj[0].view(torch.uint8), module.gate_up_proj[1].view(torch.uint8))
    assert torch.equal(again.gate_up_scale[0], module.gate_up_scale[1])
    assert {n.split(".experts.")[1].split(".")[0] for n in src.reads} == {"5"}


def test_quantize_fp8_makes_a_dense_checkpoints_experts_fp8():
    pairs = [(1, e) for e in range(16)]
    (dense, _), = load_experts("tiny-v3", pairs).values()
    (fp8, _), = load_experts("tiny-v3", pairs, quantize="fp8").values()
    assert isinstance(fp8, FP8Experts) and isinstance(dense, RoutedExperts)
    reference = FP8Experts.from_dense(dense)
    for name, p in fp8.named_parameters():
        assert torch.equal(p.view(torch.uint8) if p.dtype == FP8 else p,
                           getattr(reference, name).view(torch.uint8) if p.dtype == FP8 else getattr(reference, name))


def _edited(fp8_v3, tmp_path, edit):
    """A copy of the FP8 checkpoint with `edit(tensors, config)` applied."""
    path, _ = fp8_v3
    out = tmp_path / "edited"
    shutil.copytree(path / "fp8", out)
    tensors = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


EXPERT = "model.layers.1.mlp.experts.2.down_proj.weight"


@pytest.mark.parametrize("edit,error,words", [
    (lambda t, c: t.pop(EXPERT + "_scale_inv"), KeyError, f"has no block scales '{EXPERT}_scale_inv'"),
    (lambda t, c: t.__setitem__(EXPERT + "_scale_inv", torch.ones(1, 1)), ValueError, "need [2, 2]"),
    (lambda t, c: c["quantization_config"].__setitem__("weight_block_size", [64, 64]), ValueError,
     "weight_block_size [64, 64]"),
    (lambda t, c: c["quantization_config"].__setitem__("quant_method", "awq"), ValueError, "quant_method 'awq'"),
    (lambda t, c: c.pop("quantization_config"), ValueError, "no quantization_config"),
])
def test_bad_fp8_checkpoints_are_refused_before_anything_is_read(fp8_v3, tmp_path, edit, error, words):
    bad = _edited(fp8_v3, tmp_path, edit)
    with pytest.raises(error) as err:
        src = SafetensorsSource(bad)
        load_experts(src, [(1, 2), (2, 0)])
    assert words in str(err.value)
    if "src" in locals():
        assert src.reads == [], "a bad checkpoint was half-loaded"


def test_the_multi_token_prediction_layer_is_read_only_as_a_draft_and_says_so(fp8_v3, tmp_path, caplog):
    path, oracle = fp8_v3

    def add_mtp(tensors, config):  # DeepSeek-V3 ships its MTP module as the layer after the last
        config["num_nextn_predict_layers"] = 1
        tensors["model.layers.3.eh_proj.weight"] = torch.zeros(160, 320)
        tensors["model.layers.3.enorm.weight"] = torch.ones(160)

    with_mtp = _edited(fp8_v3, tmp_path, add_mtp)
    with caplog.at_level("INFO", logger="moe_service.checkpoint"):
        src = SafetensorsSource(with_mtp)
        model = load_model(src)
    assert "2 tensors of the multi-token-prediction layer(s) (model.layers.3 and above) are read only as a draft" \
        in caplog.text
    assert not [n for n in src.reads if n.startswith("model.layers.3.")] and src.args.num_nextn_predict_layers == 1
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert (model(ids) - oracle(ids).logits).abs().max().item() <= 1e-4
