"""Roofline cost model: how long a piece of work takes on a device, from the bytes it must read and
the FLOPs it must do, max(bytes / bandwidth, FLOPs / peak), plus a fixed cost per call; on a device that
does not overlap its reads with its arithmetic (one CPU thread) the two add up instead. Pure arithmetic
over datasheet numbers (GPUs) or this machine's calibration (`moe-service calibrate`); everything it
produces is a prediction, labelled so wherever it is shown."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from moe_service.model.args import ModelArgs

BF16 = 2  # bytes per value


@dataclass(frozen=True)
class Device:
    name: str
    memory_bandwidth: float  # bytes/s
    flops: float  # dense FLOP/s at `itemsize`
    source: str
    itemsize: int = BF16  # bytes per weight value as this device serves them
    call_s: float = 0.0  # fixed cost of one layer call on a worker (launch, dispatch bookkeeping)
    # reading an expert's weights for a product of a few rows: a CPU's BLAS packs them for a GEMM, slower
    # than its one-row GEMV; None: as memory_bandwidth
    multi_row_bandwidth: float | None = None
    # reads and arithmetic overlap (a GPU's many SMs stream weights while others multiply): max of the two;
    # False: they follow each other (one CPU thread packs a weight block, then multiplies it): their sum
    overlap: bool = True
    # bytes per routed-expert weight where they are stored otherwise (1: FP8 blocks, dequantized to compute);
    # None: itemsize
    expert_itemsize: int | None = None
    memory_bytes: float = 0.0  # device memory (0: not known)

    @property
    def expert_bytes_per_weight(self) -> int:
        return self.expert_itemsize or self.itemsize

    def seconds(self, nbytes: float, flops: float) -> float:
        return self.combine(nbytes / self.memory_bandwidth, flops / self.flops)

    def combine(self, read_s: float, compute_s: float) -> float:
        return max(read_s, compute_s) if self.overlap else read_s + compute_s


DEVICES = {
    "H100": Device("H100 SXM5 80GB", 3.35e12, 989e12, "NVIDIA H100 Tensor Core GPU datasheet: HBM3 3.35 TB/s, "
                   "BF16 989 TFLOPS dense; 20 us per call assumed", call_s=20e-6, memory_bytes=80e9),
    "H200": Device("H200 SXM 141GB", 4.8e12, 989e12, "NVIDIA H200 Tensor Core GPU datasheet: HBM3e 4.8 TB/s, "
                   "BF16 989 TFLOPS dense; 20 us per call assumed", call_s=20e-6, memory_bytes=141e9),
}


EXPERT_DTYPES = {"bf16": None, "fp8": 1}


def device(name: str, experts: str = "bf16") -> Device:
    """A named GPU (datasheet numbers), or "cpu": this machine, as `moe-service calibrate` measured it;
    `experts="fp8"`: its routed experts stored as FP8 blocks (one byte a weight, read at that size)."""
    if experts not in EXPERT_DTYPES:
        raise ValueError(f"expert dtype {experts!r} is not known; known: {sorted(EXPERT_DTYPES)}")
    if name in DEVICES:
        dev = DEVICES[name]
    elif name == "cpu":
        dev = load_calibration()
    else:
        raise ValueError(f"unknown device {name!r}; known: {sorted(DEVICES)} and 'cpu' (after moe-service calibrate)")
    if experts == "fp8":
        dev = dataclasses.replace(dev, name=f"{dev.name}, FP8 experts", expert_itemsize=EXPERT_DTYPES[experts])
    return dev


CALIBRATION_FILE = Path.home() / ".cache" / "moe-service" / "cpu-calibration.json"


def save_calibration(dev: Device, path: Path = CALIBRATION_FILE, **measured) -> None:
    """`dev` as load_calibration reads it, with what it was fitted on (`measured`) beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**dataclasses.asdict(dev), **measured}, indent=2))


def load_calibration(path: Path = CALIBRATION_FILE) -> Device:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `moe-service calibrate` first (about a minute)")
    d = json.loads(path.read_text())
    return Device(**{f.name: d[f.name] for f in dataclasses.fields(Device) if f.name in d})


def worker_layer_seconds(args: ModelArgs, dev: Device, touched: float, pairs: float, multi: float = 0.0) -> float:
    """One worker's share of one MoE layer: a fixed per-call cost plus max(bytes / bandwidth, FLOPs / peak)
    (their sum where the device does not overlap them), where bytes are the weights of every touched
    replica plus the pairs' activations (a row in, a row out), and FLOPs come from the routed pairs (2 per
    weight per pair). `multi` of the touched replicas have two or more pairs: their weights are read at the
    device's multi-row bandwidth."""
    w = expert_bytes(args, dev.expert_bytes_per_weight)
    read_s = ((touched - multi) * w + 2 * pairs * args.hidden_size * dev.itemsize) / dev.memory_bandwidth
    read_s += multi * w / (dev.multi_row_bandwidth or dev.memory_bandwidth)
    return dev.call_s + dev.combine(read_s, 2 * pairs * expert_bytes(args, 1) / dev.flops)


def worker_cost(args: ModelArgs, dev: Device):
    """worker_layer_seconds of one model's experts on one device, as placement's `worker_seconds` takes it:
    (touched replicas, pairs, replicas with 2+ pairs) -> seconds."""
    return lambda touched, pairs, multi=0.0: worker_layer_seconds(args, dev, touched, pairs, multi)


def share_seconds(worker_seconds, pairs_per_replica) -> float:
    """A worker_cost function applied to one worker's share of a layer call, given each of its replicas'
    routed pairs in that call."""
    import numpy as np

    c = np.asarray(pairs_per_replica)
    return worker_seconds(float((c > 0).sum()), float(c.sum()), float((c > 1).sum()))


# real checkpoints' shapes (config.json), for projections only: no weights behind them
SHAPES = {
    "DeepSeek-V2-Lite": ModelArgs(name="DeepSeek-V2-Lite"),  # ModelArgs' defaults are V2-Lite's
    "DeepSeek-V2": ModelArgs(
        name="DeepSeek-V2", hidden_size=5120, num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1536, intermediate_size=12288,
        vocab_size=102400, topk_method="group_limited_greedy", n_group=8, topk_group=3, first_k_dense_replace=1),
    # the V3 family: sigmoid routing with a correction bias, groups ranked by their top-2; MTP layers aside
    "DeepSeek-V3": ModelArgs(
        name="DeepSeek-V3", model_type="deepseek_v3", topk_method="noaux_tc", scoring_func="sigmoid",
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, moe_intermediate_size=2048, intermediate_size=18432, vocab_size=129280, n_group=8,
        topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=3,
        num_nextn_predict_layers=1),
    "Kimi-K2": ModelArgs(
        name="Kimi-K2", model_type="kimi_k2", topk_method="noaux_tc", scoring_func="sigmoid", hidden_size=7168,
        num_hidden_layers=61, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=2048, intermediate_size=18432, vocab_size=163840, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.827, first_k_dense_replace=1),
}


def expert_bytes(args: ModelArgs, itemsize: int = BF16) -> int:
    """One routed expert's weights (gate, up and down projections)."""
    return 3 * args.hidden_size * args.moe_intermediate_size * itemsize


def dense_params(args: ModelArgs) -> int:
    """What a gateway holds: everything but the routed experts."""
    from moe_service.model.summary import summarize

    routed = len(args.moe_layers) * args.n_routed_experts * 3 * args.hidden_size * args.moe_intermediate_size
    return int(summarize(args)["params_total"]) - routed


def touched_experts(args: ModelArgs, tokens: int) -> float:
    """Expected distinct experts a layer's `tokens` route to, with uniform routing."""
    E, K = args.n_routed_experts, args.num_experts_per_tok
    return E * (1 - (1 - K / E) ** tokens)


def gateway_step_seconds(args: ModelArgs, device: Device, batch: int, context: int) -> float:
    """One decode step of the dense part for `batch` sequences of `context` tokens: every dense weight
    and each sequence's latent KV cache read once; 2 FLOPs per weight per token, plus attention."""
    import torch

    from moe_service.model.summary import summarize

    dtype = torch.float32 if device.itemsize == 4 else torch.bfloat16
    kv_bytes = summarize(args, dtype)["kv_cache_bytes_per_token"]
    nbytes = dense_params(args) * device.itemsize + batch * context * kv_bytes
    attn = 2 * args.num_attention_heads * context * (2 * args.kv_lora_rank + args.qk_rope_head_dim)
    flops = batch * (2 * dense_params(args) + args.num_hidden_layers * attn)
    return device.seconds(nbytes, flops)


def expert_layer_seconds(args: ModelArgs, device: Device, tokens: int, workers: int) -> float:
    """One MoE layer's routed experts on `workers` devices, balanced: the slowest worker reads its share
    of the touched experts' weights and does its share of the FLOPs."""
    per_worker = max(touched_experts(args, tokens) / workers, min(1.0, touched_experts(args, tokens)))
    flops = 2 * tokens * args.num_experts_per_tok * expert_bytes(args, 1) / workers
    return device.seconds(per_worker * expert_bytes(args, device.expert_bytes_per_weight), flops)


def dispatch_layer_seconds(args: ModelArgs, tokens: int, software_s: float, rtt_s: float, link_bytes_s: float,
                           itemsize: int = BF16) -> float:
    """One layer's call to the workers: the software's own cost (measured), the network's round trip,
    and the hidden rows both ways over the gateway's link."""
    return software_s + rtt_s + 2 * tokens * args.hidden_size * itemsize / link_bytes_s


def project_decode_step(args: ModelArgs, device: Device, batch: int, context: int, workers: int,
                        software_s: float, rtt_s: float = 50e-6, link_bytes_s: float = 12.5e9) -> dict[str, float]:
    """One decode step of `batch` sequences, term by term (projected, not measured)."""
    L = len(args.moe_layers)
    terms = {
        "gateway_s": gateway_step_seconds(args, device, batch, context),
        "dispatch_s": L * dispatch_layer_seconds(args, batch, software_s, rtt_s, link_bytes_s),
        "experts_s": L * expert_layer_seconds(args, device, batch, workers),
    }
    terms["step_s"] = sum(terms.values())
    terms["dominant"] = max(("gateway_s", "dispatch_s", "experts_s"), key=terms.get)
    return terms


TERMS_HEADER = f"{'gateway':>10}{'dispatch':>10}{'experts':>10}"  # the columns format_terms_ms fills


def format_terms_ms(r: dict) -> str:
    """A step's gateway, dispatch and experts terms (seconds in `r`), as table columns in milliseconds."""
    return f"{r['gateway_s'] * 1e3:8.2f}ms{r['dispatch_s'] * 1e3:8.2f}ms{r['experts_s'] * 1e3:8.2f}ms"
