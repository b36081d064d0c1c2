"""DeepSeek-V3's multi-token-prediction layer against transformers' DeepseekV3 on the same weights: the
MTP block is a DeepseekV3DecoderLayer after the main ones, fed eh_proj(cat[enorm(embed(t+1)), hnorm(h)])."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_service import load_model
from moe_service.checkpoint import expected_shapes
from moe_service.model.cache import PagedLatentCache
from tests.oracle import V3_CONFIGS, hf_model

TOL = 1e-4
PRESET = "tiny-v3-mtp"


@pytest.fixture(scope="module", params=["v3_grouped", "v3_qlora_yarn_dense2"])
def pair(request, tmp_path_factory):
    """transformers' model with one layer more than the checkpoint says: that layer is the MTP block;
    the MTP's own tensors (enorm, hnorm, eh_proj, shared_head) are added to the file beside it."""
    path = tmp_path_factory.mktemp(request.param)
    overrides = V3_CONFIGS[request.param]
    main_layers = overrides.get("num_hidden_layers", 3)
    hf = hf_model({**overrides, "num_hidden_layers": main_layers + 1}, family="v3")
    hf.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(num_hidden_layers=main_layers, num_nextn_predict_layers=1)
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    D, V = config["hidden_size"], config["vocab_size"]
    g = torch.Generator().manual_seed(5)
    p = f"model.layers.{main_layers}."
    extra = {p + "enorm.weight": 1 + 0.1 * torch.randn(D, generator=g), p + "hnorm.weight": 1 + 0.1 * torch.randn(D, generator=g),
             p + "eh_proj.weight": 0.1 * torch.randn(D, 2 * D, generator=g),
             p + "shared_head.norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
             p + "shared_head.head.weight": 0.1 * torch.randn(V, D, generator=g)}
    save_file({**tensors, **extra}, path / "model.safetensors", metadata={"format": "pt"})
    return hf, extra, main_layers, path


def reference(hf, extra, main_layers: int, ids: torch.Tensor) -> torch.Tensor:
    """transformers' MTP logits: its layer `main_layers` runs on the MTP's input in place of the main
    model's output (a pre-hook swaps it in), at the main model's positions; then the shared head."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    D = hf.config.hidden_size

    def norm(name: str) -> DeepseekV3RMSNorm:
        n = DeepseekV3RMSNorm(D, eps=hf.config.rms_norm_eps)
        n.weight.data.copy_(extra[f"model.layers.{main_layers}.{name}.weight"])
        return n

    inputs, nexts = ids[:, :-1], ids[:, 1:]
    block = hf.model.layers[main_layers]
    seen = {}

    def swap(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        x = torch.cat([norm("enorm")(hf.model.embed_tokens(nexts)), norm("hnorm")(h)], dim=-1)
        x = x @ extra[f"model.layers.{main_layers}.eh_proj.weight"].T
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def keep(_module, _args, output):
        seen["y"] = output[0] if isinstance(output, tuple) else output

    hooks = [block.register_forward_pre_hook(swap, with_kwargs=True), block.register_forward_hook(keep)]
    try:
        with torch.no_grad():
            hf.model(inputs)
            return norm("shared_head.norm")(seen["y"]) @ extra[f"model.layers.{main_layers}.shared_head.head.weight"].T
    finally:
        for h in hooks:
            h.remove()


def test_mtp_logits_match_transformers(pair):
    hf, extra, main_layers, path = pair
    ours = load_model(path, with_mtp=True)
    assert list(ours.mtp) == [str(main_layers)] and ours.mtp[str(main_layers)].is_moe
    ids = torch.randint(0, ours.args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    want = reference(hf, extra, main_layers, ids)
    h, ctx = ours.hidden(ids[:, :-1])
    _, got = ours.draft(h, ids[:, 1:], ctx)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL
    # the main model is unchanged by the MTP layer beside it
    assert (ours(ids) - load_model(path)(ids)).abs().max().item() == 0.0


def test_the_mtp_layer_decodes_through_its_own_cache_layer():
    """Prefill then one token at a time through the paged cache (the MTP's own latent layer) gives the
    logits of the whole sequence at once."""
    model = load_model(PRESET, with_mtp=True)
    ids = torch.randint(3, model.args.vocab_size, (2, 21), generator=torch.Generator().manual_seed(4))
    h, ctx = model.hidden(ids[:, :-1])
    _, full = model.draft(h, ids[:, 1:], ctx)
    cache = PagedLatentCache.for_rows(model.args, 2, 32, with_mtp=True)
    got = []
    for start, n in ((0, 8), *((t, 1) for t in range(8, 20))):
        step = ids[:, start:start + n]
        h, ctx = model.hidden(step, cache, start=torch.full((2,), start))
        _, logits = model.draft(h, ids[:, start + 1:start + n + 1], ctx)
        got.append(logits)
    assert (torch.cat(got, dim=1) - full).abs().max().item() <= TOL


def test_a_model_without_mtp_reads_no_mtp_tensor_and_the_preset_has_them():
    args = load_model(PRESET).args
    assert args.mtp_layers == [args.num_hidden_layers]
    mtp_names = set(expected_shapes(args, mtp=True)) - set(expected_shapes(args))
    assert {f"model.layers.{args.num_hidden_layers}.{n}.weight" for n in ("enorm", "hnorm", "eh_proj")} <= mtp_names
    assert any(".mlp.experts." in n for n in mtp_names)  # its block is MoE, as in V3
