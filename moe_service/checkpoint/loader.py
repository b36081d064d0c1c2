"""Build modules from a tensor source, reading only the tensors each process hosts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

from moe_service.checkpoint.names import expected_shapes, expert_hf_names, hf_name, parse_expert_name
from moe_service.checkpoint.sources import TensorSource, open_source
from moe_service.model.experts import RoutedExperts
from moe_service.model.fp8 import FP8Experts, dequantize, quantize as quantize_blocks, scale_grid
from moe_service.model.rope import Rotary
from moe_service.model.transformer import Transformer
from moe_service.progress import Progress

# tensors kept in fp32 whatever the serving dtype: routing must not change with the dtype
FP32_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")


def scale_name(name: str) -> str:
    """The block scales of an FP8 weight `X.weight`: `X.weight_scale_inv`."""
    return name + "_scale_inv"


def validate(source: TensorSource, names: Iterable[str]) -> None:
    """Every tensor a load will read is there, with the shape the config implies, and each FP8 one with
    its block scales (one per 128 x 128 block, the edges partial). Checked before anything is read, so a
    bad checkpoint leaves nothing half-loaded."""
    shapes, have = expected_shapes(source.args, mtp=True), source.names()
    for name in names:
        if name not in have:
            raise KeyError(f"{source.describe(name)} has no tensor {name!r}, which this model's config needs")
        got, want = tuple(source.shape(name)), shapes.get(name)
        if want is not None and got != tuple(want):
            raise ValueError(f"tensor {name!r} in {source.describe(name)} has shape {list(got)}; "
                             f"config.json implies {list(want)}")
        if source.is_fp8(name):
            if not source.fp8:
                raise ValueError(f"tensor {name!r} in {source.describe(name)} is float8_e4m3fn, but config.json has "
                                 "no quantization_config (quant_method fp8, weight_block_size [128, 128])")
            scales = scale_name(name)
            if scales not in have:
                raise KeyError(f"FP8 tensor {name!r} in {source.describe(name)} has no block scales {scales!r}")
            grid = scale_grid(got)
            if tuple(source.shape(scales)) != grid:
                raise ValueError(f"block scales {scales!r} have shape {list(source.shape(scales))}; the 128 x 128 "
                                 f"blocks of {name!r} {list(got)} need {list(grid)}")


def _fetch(source: TensorSource, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A validated tensor in `dtype` (an FP8 one dequantized; the router's in float32 whatever `dtype`)."""
    keep_fp32 = any(name.endswith(s) for s in FP32_SUFFIXES)
    if source.is_fp8(name):
        return dequantize(source.read(name), source.read(scale_name(name)), None).to(dtype)
    return source.read(name).to(torch.float32 if keep_fp32 else dtype)


@torch.no_grad()
def load_model(
    source: "str | Path | TensorSource", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    with_routed_experts: bool = True, progress: bool = False, with_mtp: bool = False,
) -> Transformer:
    """A Transformer with weights from a checkpoint directory or preset name.

    With `with_routed_experts=False` (the gateway) no routed expert tensor is read; with `with_mtp` the
    multi-token-prediction layers (`model.layers.{num_hidden_layers + i}`) are read too.
    """
    src = open_source(source)
    args = src.args
    with torch.device("meta"):
        model = Transformer(args, with_routed_experts=with_routed_experts, with_mtp=with_mtp)
    routed = [layer for layer in [*args.moe_layers, *(args.mtp_layers if with_mtp else [])]
              if with_routed_experts and args.is_moe_layer(layer)]
    have = src.names()
    plain_names = [_source_name(n, args, have) for n, _ in model.named_parameters() if ".mlp.experts." not in n]
    expert_names = [n for layer in routed for e in range(args.n_routed_experts)
                    for names in expert_hf_names(layer, e).values() for n in names]
    validate(src, plain_names + expert_names)
    model.to(dtype=dtype).to_empty(device=device)
    model.rotary = Rotary(args).to(device)  # a computed buffer, lost on the meta device
    params = dict(model.named_parameters())
    expert_params = [n for n in params if ".mlp.experts." in n]
    plain = [n for n in params if n not in expert_params]
    total = sum(params[n].numel() * params[n].element_size() for n in params)
    bar = Progress("loading weights", total, unit="B", enabled=progress)
    for name in plain:
        t = _fetch(src, _source_name(name, args, have), dtype)
        p = params[name]
        if p.dtype != t.dtype:  # the fp32 gate
            p.data = torch.empty(p.shape, dtype=t.dtype, device=device)
        p.data.copy_(t)
        bar.advance(p.numel() * p.element_size())
    for layer in routed:
        experts = (model.layers[layer] if layer < args.num_hidden_layers else model.mtp[str(layer)]).mlp.experts
        fill_experts(src, experts, [(layer, e) for e in range(args.n_routed_experts)], dtype, bar)
    bar.close()
    return model.eval()


def _source_name(local: str, args, have: set[str]) -> str:
    if local == "lm_head.weight" and args.tie_word_embeddings:
        return hf_name("embed_tokens.weight")
    name = hf_name(local)
    if local.endswith(".shared_head.head.weight") and name not in have:
        # an MTP layer's head is a copy of the model's (DeepSeek-V3 stores it; a draft trained here does not)
        return _source_name("lm_head.weight", args, have)
    return name


Experts = RoutedExperts | FP8Experts


@torch.no_grad()
def fill_experts(src: TensorSource, experts: Experts, pairs: list[tuple[int, int]], dtype: torch.dtype,
                 bar: Progress | None = None, kept: tuple[Experts, list[int]] | None = None) -> None:
    """Local expert i of `experts` becomes expert pairs[i]: copied from `kept` (a module of the same kind
    and the expert id of each of its local experts, FP8 scales included) where it is there, read from the
    source otherwise. An FP8 module reads FP8 weights as they are, and quantizes dense ones."""
    old, old_ids = kept if kept is not None else (None, [])
    for i, (layer, expert) in enumerate(pairs):
        if expert in old_ids:
            j = old_ids.index(expert)
            for name, param in experts.named_parameters():
                param.data[i].copy_(getattr(old, name).data[j])
            continue
        for param_name, names in expert_hf_names(layer, expert).items():
            param = getattr(experts, param_name)
            if isinstance(experts, FP8Experts):
                scales = getattr(experts, param_name.replace("_proj", "_scale"))
                parts = [_fp8(src, n) for n in names]
                param.data[i].copy_(torch.cat([q for q, _ in parts], dim=0))
                scales.data[i].copy_(torch.stack([sc for _, sc in parts]) if len(parts) > 1 else parts[0][1])
            else:
                param.data[i].copy_(torch.cat([_fetch(src, n, dtype) for n in names], dim=0))
            if bar is not None:
                bar.advance(param.data[i].numel() * param.element_size())


def _fp8(src: TensorSource, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert projection as FP8 blocks: read as they are, or quantized from a dense checkpoint."""
    if src.is_fp8(name):
        return src.read(name), src.read(scale_name(name)).float()
    return quantize_blocks(src.read(name))


def empty_experts(like: Experts, num_local: int, device: str | torch.device) -> Experts:
    """A module of `like`'s kind, shape and compute dtype for `num_local` experts on `device`, unfilled."""
    if isinstance(like, FP8Experts):
        return FP8Experts(num_local, like.dim, like.inter_dim, like.dtype, device).eval()
    return RoutedExperts(num_local, like.dim, like.inter_dim).to(device=device, dtype=like.dtype).eval()


@torch.no_grad()
def join_experts(a: Experts, b: Experts) -> Experts:
    """One module on `a`'s device: `a`'s local experts, then `b`'s (copied from wherever `b` is)."""
    out = empty_experts(a, a.num_local + b.num_local, a.device)
    for name, param in out.named_parameters():
        param.data[:a.num_local].copy_(getattr(a, name).data)
        param.data[a.num_local:].copy_(getattr(b, name).data)
    return out


@torch.no_grad()
def load_experts(
    source: "str | Path | TensorSource", pairs: Iterable[tuple[int, int]], dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", progress: bool = False,
    kept: dict[int, tuple[Experts, list[int]]] | None = None, quantize: str | None = None,
) -> dict[int, tuple[Experts, list[int]]]:
    """The routed experts one worker hosts: layer -> (experts module, expert id of each local index).
    What `kept` already holds (the worker's current layers) is copied from there, not read again. An FP8
    checkpoint's experts stay FP8 (`FP8Experts`, computed in `dtype`), and `quantize="fp8"` makes a dense
    checkpoint's so."""
    if quantize not in (None, "fp8"):
        raise ValueError(f"quantize must be 'fp8' or unset, got {quantize!r}")
    src = open_source(source)
    args = src.args
    by_layer: dict[int, list[int]] = {}
    for layer, expert in sorted(set(pairs)):
        if not args.is_moe_layer(layer):
            raise ValueError(f"layer {layer} is not an MoE layer; MoE layers are {args.moe_layers}")
        if not 0 <= expert < args.n_routed_experts:
            raise ValueError(f"expert {expert} is out of range; layers have {args.n_routed_experts} routed experts")
        by_layer.setdefault(layer, []).append(expert)
    names = [n for layer, experts in by_layer.items() for e in experts
             for ns in expert_hf_names(layer, e).values() for n in ns]
    validate(src, names)
    fp8 = quantize == "fp8" or (bool(names) and src.is_fp8(names[0]))
    itemsize = 1 if fp8 else torch.empty((), dtype=dtype).element_size()
    per_expert = 3 * args.hidden_size * args.moe_intermediate_size * itemsize
    bar = Progress("loading experts", per_expert * sum(map(len, by_layer.values())), unit="B", enabled=progress)
    out = {}
    D, I = args.hidden_size, args.moe_intermediate_size
    for layer, experts in by_layer.items():
        module = (FP8Experts(len(experts), D, I, dtype, device) if fp8
                  else RoutedExperts(len(experts), D, I).to(device=device, dtype=dtype))
        fill_experts(src, module, [(layer, e) for e in experts], dtype, bar, (kept or {}).get(layer))
        out[layer] = (module.eval(), experts)
    bar.close()
    return out


def save_hf_checkpoint(source: "str | Path | TensorSource", path: str | Path, max_shard_bytes: int = 2 << 30,
                       progress: bool = False) -> Path:
    """Write a source (e.g. a preset) as a Hugging Face directory: config.json, safetensors shards, index."""
    src = open_source(source)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(src.args.to_hf_config(), indent=2))
    names = sorted(src.names())
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    bar = Progress("writing checkpoint", len(names), unit="tensors", enabled=progress)
    # tensors are drawn once and written shard by shard so memory stays at one shard
    weight_map: dict[str, str] = {}
    written: list[str] = []

    def flush() -> None:
        idx = len(written) + 1
        file = f"model-{idx:05d}.safetensors"
        save_file(shards[-1], out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in shards[-1]})
        written.append(file)
        shards[-1] = {}
        sizes[-1] = 0

    for name in names:
        t = src.read(name).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = t
        sizes[-1] += nbytes
        bar.advance(1)
    flush()
    bar.close()
    if len(written) == 1:
        (out / written[0]).rename(out / "model.safetensors")
    else:
        total = len(written)
        renamed = {}
        for i, file in enumerate(written, 1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            (out / file).rename(out / final)
            renamed[file] = final
        index = {"metadata": {}, "weight_map": {n: renamed[f] for n, f in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


__all__ = ["load_model", "load_experts", "save_hf_checkpoint", "parse_expert_name"]
