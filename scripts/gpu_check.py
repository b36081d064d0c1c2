#!/usr/bin/env python3
"""GPU checks, without Ray, in at most a few minutes; writes one JSON file (scripts/gpu_check.sh).

On CUDA it checks and times what the CPU machines cannot:
- parity: the in-process model (the gateway's compute) against transformers' DeepseekV2 on the same
  weights, fp32 logits and bf16 greedy tokens;
- the routed experts' grouped GEMM in bf16 against the per-expert loop;
- an expert gRPC server in a subprocess holding experts on the GPU, called over loopback on a
  persistent stream, against the in-process experts and a streamed echo;
- per-layer timings of a DeepSeek-V2-Lite-shaped stack (real dimensions, few layers) at batch 1, 32, 256.

Where there is no GPU it says so and exits 0. `--device cpu` runs the same checks on the CPU at small
shapes (the suite does, so the script cannot rot where no GPU is lent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Timer:
    """Wall time of a block on `device`, synchronised there (CUDA kernels run asynchronously)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median(self, fn, repeats: int = 10, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def check_parity(device: torch.device, tokens: int) -> dict:
    """fp32 logits and bf16 greedy tokens of the in-process model against transformers'."""
    from moe_service.checkpoint import load_model
    from moe_service.engine import Engine
    from moe_service.sampling import SamplingParams
    from tests.oracle import CONFIGS, write_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_checkpoint(Path(tmp), dict(CONFIGS["qlora_grouped_scaled"], num_hidden_layers=3))
        g = torch.Generator().manual_seed(7)
        prompt = torch.randint(3, 257, (1, 21), generator=g)
        hf32 = hf.to(device)
        ours32 = load_model(tmp, device=device)
        with torch.no_grad():
            want = hf32(prompt.to(device)).logits
        got = ours32(prompt.to(device))
        out["fp32_max_abs_logit_diff"] = float((got - want).abs().max())
        out["fp32_ok"] = out["fp32_max_abs_logit_diff"] <= 1e-4
        hf16 = hf32.to(torch.bfloat16)
        ours16 = load_model(tmp, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            want_ids = hf16.generate(prompt.to(device), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, prompt.shape[1]:].tolist()
        got_ids = Engine(ours16).generate([prompt[0].tolist()], SamplingParams(max_new_tokens=tokens,
                                                                               ignore_eos=True))[0].output
        same = next((i for i, (a, b) in enumerate(zip(got_ids, want_ids)) if a != b), len(want_ids))
        out.update(bf16_tokens=tokens, bf16_tokens_equal_before_first_difference=same,
                   bf16_ok=same == len(want_ids))
    return out


def check_grouped_gemm(device: torch.device, dims: dict) -> dict:
    """The routed experts' grouped path against the per-expert loop, and both timed, in the serving dtype."""
    from moe_service.model.experts import RoutedExperts

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    E, D, inter, K = dims["experts"], dims["hidden"], dims["inter"], dims["top_k"]
    experts = RoutedExperts(E, D, inter).to(device=device, dtype=dtype)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    timer = Timer(device)
    out = {"dtype": str(dtype).removeprefix("torch."), "grouped_path_available": None, "batches": {}}
    for T in dims["batches"]:
        x = torch.randn(T, D, device=device, dtype=dtype)
        slots = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)])
        w = torch.rand(T, K, device=device)
        grouped = experts._use_grouped(x)
        out["grouped_path_available"] = grouped
        y = experts(x, w, slots)
        looped = experts._use_grouped
        experts._use_grouped = lambda _x: False  # the per-expert loop on the same input
        try:
            ref = experts(x, w, slots)
            t_loop = timer.median(lambda: experts(x, w, slots))
        finally:
            experts._use_grouped = looped
        t_used = timer.median(lambda: experts(x, w, slots))
        rel = float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
        out["batches"][T] = {"used_path": "grouped" if grouped else "loop", "s": t_used, "loop_s": t_loop,
                             "relative_difference_to_loop": rel}
    return out


def _server(queue, device: str, dims: dict, seed: int) -> None:
    """An expert gRPC server holding experts on `device`, and a stream echo beside it."""
    import grpc

    from moe_service.bench.transport_bench import _start_echo
    from moe_service.model.experts import RoutedExperts
    from moe_service.transport import fastwire
    from moe_service.transport.expert_server import EXPERT_SERVICE, ExpertServicer, HostedLayer
    from moe_service.transport.options import grpc_options

    async def main() -> None:
        torch.manual_seed(seed)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        module = RoutedExperts(dims["experts"], dims["hidden"], dims["inter"]).to(device=device, dtype=dtype)
        torch.nn.init.normal_(module.gate_up_proj, std=0.02)
        torch.nn.init.normal_(module.down_proj, std=0.02)
        servicer = ExpertServicer({1: HostedLayer.build(module, list(range(dims["experts"])), dims["experts"])},
                                  worker_id="gpu-check", hidden_size=dims["hidden"], num_experts=dims["experts"],
                                  replicas_per_layer=dims["experts"])
        server = grpc.aio.server(options=grpc_options())
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(EXPERT_SERVICE, {
            "RunExpertsStream": grpc.stream_stream_rpc_method_handler(
                servicer.RunExpertsStream, request_deserializer=fastwire.decode_request, response_serializer=None),
        }),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _, echo_port = await _start_echo(256 << 20)
        queue.put((f"127.0.0.1:{port}", echo_port))
        await asyncio.Event().wait()

    asyncio.run(main())


def check_expert_server(device: torch.device, dims: dict) -> dict:
    """Experts on `device` in a server process, called on a persistent stream as a gateway calls them."""
    from moe_service.bench.transport_bench import StreamEcho
    from moe_service.model.experts import RoutedExperts
    from moe_service.transport import fastwire
    from moe_service.transport.expert_client import ExpertStreams

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_server, args=(queue, device.type, dims, 11), daemon=True)
    proc.start()
    out: dict = {"batches": {}}
    try:
        address, echo_port = queue.get(timeout=120)
        torch.manual_seed(11)  # the same experts, in this process, for the expected answers
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        local = RoutedExperts(dims["experts"], dims["hidden"], dims["inter"]).to(device=device, dtype=dtype)
        torch.nn.init.normal_(local.gate_up_proj, std=0.02)
        torch.nn.init.normal_(local.down_proj, std=0.02)
        streams, echo = ExpertStreams(), StreamEcho([echo_port])
        try:
            for T in dims["batches"]:
                x = torch.randn(T, dims["hidden"], dtype=dtype)
                e = torch.stack([torch.randperm(dims["experts"])[: dims["top_k"]] for _ in range(T)]).to(torch.int32)
                w = torch.rand(T, dims["top_k"])

                def call():
                    seq = streams.next_seq()
                    payload = fastwire.encode_request(1, x, e, w, seq=seq, deadline_s=60.0)
                    deadline = time.monotonic() + 60
                    sent = streams.send([(address, payload, seq, (dtype, (T, dims["hidden"])))], deadline)
                    return streams.receive(sent, deadline)[0]

                answer = call()
                if not isinstance(answer, fastwire.Response):
                    raise RuntimeError(f"the expert server answered {answer}")
                want = local(x.to(device), w.to(device), e.to(device)).float().cpu()
                rel = float((answer.output.float() - want).norm() / want.norm().clamp_min(1e-12))
                rtts, computes, floors = [], [], []
                blob = fastwire.encode_request(1, x, e, w, seq=1, deadline_s=60.0)
                for i in range(50):
                    t0 = time.perf_counter()
                    r = call()
                    t1 = time.perf_counter()
                    echo.round_trip(blob)
                    t2 = time.perf_counter()
                    if i >= 5:
                        rtts.append(t1 - t0)
                        computes.append(r.compute_seconds)
                        floors.append(t2 - t1)
                rtt, compute, floor = (statistics.median(v) for v in (rtts, computes, floors))
                out["batches"][T] = {"relative_difference": rel, "round_trip_s": rtt, "worker_compute_s": compute,
                                     "transport_s": rtt - compute, "stream_echo_s": floor,
                                     "transport_vs_echo": (rtt - compute) / floor}
        finally:
            streams.close()
            echo.close()
    finally:
        proc.kill()
        proc.join(10)
    return out


def check_layer_timings(device: torch.device, dims: dict) -> dict:
    """A DeepSeek-V2-Lite-shaped stack (real dimensions, `layers` layers): per MoE layer, attention
    over a 512-token context, the gate, the shared experts and the routed experts, at each batch size."""
    from moe_service.model.args import ModelArgs
    from moe_service.model.cache import LatentCache
    from moe_service.model.transformer import Transformer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = ModelArgs(**dims["model"])
    with torch.device(device):
        model = Transformer(args).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.eval()
    parts = {"attention": [], "gate": [], "shared_experts": [], "routed_experts": []}
    timer = Timer(device)

    def timed(name):
        def pre(*_):
            timer.sync()
            parts[name].append(-time.perf_counter())

        def post(*_):
            timer.sync()
            parts[name].append(parts[name].pop() + time.perf_counter())
        return pre, post

    for layer in model.layers:
        if layer.is_moe:
            for name, module in (("attention", layer.self_attn), ("gate", layer.mlp.gate),
                                 ("shared_experts", layer.mlp.shared_experts), ("routed_experts", layer.mlp.experts)):
                pre, post = timed(name)
                module.register_forward_pre_hook(pre)
                module.register_forward_hook(post)
    out = {"model": {k: v for k, v in dims["model"].items()}, "dtype": str(dtype).removeprefix("torch."),
           "context_tokens": dims["context"], "batches": {}}
    for B in dims["batches"]:
        cache = LatentCache(args, B, dims["context"] + 8, dtype=dtype, device=device)
        ids = torch.randint(3, args.vocab_size, (B, 1), device=device)
        start = torch.full((B,), dims["context"], device=device)
        with torch.inference_mode():
            step = timer.median(lambda: model(ids, cache=cache, start=start, last_only=True), repeats=5)
            for v in parts.values():
                v.clear()
            model(ids, cache=cache, start=start, last_only=True)
        out["batches"][B] = {"decode_step_s": step, **{f"{k}_s_per_layer": statistics.median(v)
                                                        for k, v in parts.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run at small shapes")
    ns = p.parse_args(argv)
    device = torch.device(ns.device)
    report: dict = {"python": platform.python_version(), "torch": torch.__version__, "device": ns.device,
                    "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda" and not torch.cuda.is_available():
        report["skipped"] = "no CUDA device on this machine: nothing to check"
        Path(ns.out).write_text(json.dumps(report, indent=2))
        print(report["skipped"])
        return 0
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["capability"] = list(torch.cuda.get_device_capability(device))
        lite = dict(num_hidden_layers=4, vocab_size=102400, max_position_embeddings=4096)  # V2-Lite's dims
        dims = {"experts": 64, "hidden": 2048, "inter": 1408, "top_k": 6, "batches": [1, 32, 256],
                "model": lite, "context": 512, "parity_tokens": 32}
    else:  # a dry run: the same code at sizes a CPU finishes in seconds
        small = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, kv_lora_rank=64,
                     qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=512,
                     moe_intermediate_size=128, n_routed_experts=16, vocab_size=1000, max_position_embeddings=512)
        dims = {"experts": 16, "hidden": 256, "inter": 128, "top_k": 4, "batches": [1, 8], "model": small,
                "context": 64, "parity_tokens": 8}
    checks = {
        "parity": lambda: check_parity(device, dims["parity_tokens"]),
        "grouped_gemm": lambda: check_grouped_gemm(device, dims),
        "expert_server": lambda: check_expert_server(device, dims),
        "layer_timings": lambda: check_layer_timings(device, dims),
    }
    failed = False
    for name, fn in checks.items():
        t0 = time.perf_counter()
        print(f"[gpu check] {name} ...", file=sys.stderr, flush=True)
        try:
            report[name] = fn()
        except Exception:  # recorded: the other checks still run
            report[name] = {"error": traceback.format_exc()}
            failed = True
        report[name]["seconds"] = time.perf_counter() - t0
    Path(ns.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
