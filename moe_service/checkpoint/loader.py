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
from moe_service.model.rope import Rotary
from moe_service.model.transformer import Transformer
from moe_service.progress import Progress

# tensors kept in fp32 whatever the serving dtype: routing must not change with the dtype
FP32_SUFFIXES = (".mlp.gate.weight",)


def _fetch(source: TensorSource, name: str, dtype: torch.dtype) -> torch.Tensor:
    if name not in source.names():
        raise KeyError(f"{source.describe(name)} has no tensor {name!r}, which this model's config needs")
    want = expected_shapes(source.args).get(name)
    got = source.shape(name)
    if want is not None and tuple(got) != tuple(want):
        raise ValueError(
            f"tensor {name!r} in {source.describe(name)} has shape {list(got)}; config.json implies {list(want)}"
        )
    keep_fp32 = any(name.endswith(s) for s in FP32_SUFFIXES)
    return source.read(name).to(torch.float32 if keep_fp32 else dtype)


@torch.no_grad()
def load_model(
    source: "str | Path | TensorSource", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    with_routed_experts: bool = True, progress: bool = False,
) -> Transformer:
    """A Transformer with weights from a checkpoint directory or preset name.

    With `with_routed_experts=False` (the gateway) no routed expert tensor is read.
    """
    src = open_source(source)
    args = src.args
    with torch.device("meta"):
        model = Transformer(args, with_routed_experts=with_routed_experts)
    model.to(dtype=dtype).to_empty(device=device)
    model.rotary = Rotary(args).to(device)  # a computed buffer, lost on the meta device
    params = dict(model.named_parameters())
    expert_params = [n for n in params if ".mlp.experts." in n]
    plain = [n for n in params if n not in expert_params]
    total = sum(params[n].numel() * params[n].element_size() for n in params)
    bar = Progress("loading weights", total, unit="B", enabled=progress)
    for name in plain:
        src_name = hf_name(name)
        if name == "lm_head.weight" and args.tie_word_embeddings:
            src_name = hf_name("embed_tokens.weight")
        t = _fetch(src, src_name, dtype)
        p = params[name]
        if p.dtype != t.dtype:  # the fp32 gate
            p.data = torch.empty(p.shape, dtype=t.dtype, device=device)
        p.data.copy_(t)
        bar.advance(p.numel() * p.element_size())
    for layer in args.moe_layers if with_routed_experts else []:
        experts = model.layers[layer].mlp.experts
        fill_experts(src, experts, [(layer, e) for e in range(args.n_routed_experts)], dtype, bar)
    bar.close()
    return model.eval()


@torch.no_grad()
def fill_experts(src: TensorSource, experts: RoutedExperts, pairs: list[tuple[int, int]], dtype: torch.dtype,
                 bar: Progress | None = None, kept: tuple[RoutedExperts, list[int]] | None = None) -> None:
    """Local expert i of `experts` becomes expert pairs[i]: copied from `kept` (a module and the expert id
    of each of its local experts) where it is there, read from the source otherwise."""
    old, old_ids = kept if kept is not None else (None, [])
    for i, (layer, expert) in enumerate(pairs):
        if expert in old_ids:
            j = old_ids.index(expert)
            experts.gate_up_proj.data[i].copy_(old.gate_up_proj.data[j])
            experts.down_proj.data[i].copy_(old.down_proj.data[j])
            continue
        for param_name, names in expert_hf_names(layer, expert).items():
            rows = torch.cat([_fetch(src, n, dtype) for n in names], dim=0)
            param = getattr(experts, param_name)
            param.data[i].copy_(rows)
            if bar is not None:
                bar.advance(rows.numel() * rows.element_size())


@torch.no_grad()
def load_experts(
    source: "str | Path | TensorSource", pairs: Iterable[tuple[int, int]], dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", progress: bool = False,
    kept: dict[int, tuple[RoutedExperts, list[int]]] | None = None,
) -> dict[int, tuple[RoutedExperts, list[int]]]:
    """The routed experts one worker hosts: layer -> (experts module, expert id of each local index).
    What `kept` already holds (the worker's current layers) is copied from there, not read again."""
    src = open_source(source)
    args = src.args
    by_layer: dict[int, list[int]] = {}
    for layer, expert in sorted(set(pairs)):
        if not args.is_moe_layer(layer):
            raise ValueError(f"layer {layer} is not an MoE layer; MoE layers are {args.moe_layers}")
        if not 0 <= expert < args.n_routed_experts:
            raise ValueError(f"expert {expert} is out of range; layers have {args.n_routed_experts} routed experts")
        by_layer.setdefault(layer, []).append(expert)
    per_expert = 3 * args.hidden_size * args.moe_intermediate_size * torch.empty((), dtype=dtype).element_size()
    bar = Progress("loading experts", per_expert * sum(map(len, by_layer.values())), unit="B", enabled=progress)
    out = {}
    for layer, experts in by_layer.items():
        module = RoutedExperts(len(experts), args.hidden_size, args.moe_intermediate_size).to(device=device, dtype=dtype)
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
