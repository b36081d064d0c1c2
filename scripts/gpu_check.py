#!/usr/bin/env python3
"""GPU checks, without Ray, within a fixed budget; results in one JSON file, rewritten after every check.

On CUDA it checks and times what the CPU machines cannot. The plan on an H200 (expected seconds; the
whole run fits 4 minutes, the budget is GPU_CHECK_S, default 280):

| step           | expected | what                                                                        |
| -------------- | -------- | --------------------------------------------------------------------------- |
| environment    |     15 s | versions of torch, grpcio, protobuf, transformers; the device (first)       |
| parity         |     25 s | in-process model vs transformers' DeepseekV2: fp32 logits, bf16 greedy      |
| grouped_gemm   |     10 s | the routed experts' grouped GEMM in bf16 against the per-expert loop        |
| expert_server  |     40 s | experts on the GPU in a server process, called on a stream, vs a stream echo |
| remote_experts |     10 s | a gateway layer call with CUDA inputs (T = 1, 256) against that server      |
| fp8_experts    |     15 s | FP8-block experts (DeepSeek-V3's) against bf16: difference, time, ratio      |
| promotion      |      5 s | `standby: host`: a layer's parked standbys (pinned) joining it on the GPU   |
| layer_timings  |     40 s | a DeepSeek-V2-Lite-shaped stack: decode step, and per-layer parts apart     |

A check that would not fit in what is left of the budget is skipped, and says so. The file lands in
`$OUT/gpu_check.json` when OUT is set (the device machine returns only what is under $OUT), else at
`--out`; a check killed halfway (SIGTERM from the caller's limit, or worse) leaves the ones done in it.
Where there is no GPU it says so and exits 0. `--device cpu` runs the same checks on the CPU at small
shapes (the suite does, so the script cannot rot where no GPU is lent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET_S = float(os.environ.get("GPU_CHECK_S", "280"))  # the caller's limit sits about 20 s above this
CALL_TIMEOUT_S = 10.0  # one call to the expert server
SERVER_START_S = 90.0  # a server process's start, CUDA initialisation included
EXPECTED_S = {"parity": 25, "grouped_gemm": 10, "expert_server": 40, "remote_experts": 10, "fp8_experts": 15,
              "promotion": 5, "layer_timings": 40}


class Report:
    """The results so far, rewritten atomically after every change: a kill never leaves half a file."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}
        path.parent.mkdir(parents=True, exist_ok=True)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


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


def environment(device: torch.device) -> dict:
    """What ran: package versions first, so an old package is named even if every check then fails."""
    out = {"python": platform.python_version(), "device": str(device), "cuda_available": torch.cuda.is_available()}
    for pkg in ("torch", "grpcio", "protobuf", "transformers", "safetensors", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if device.type == "cuda" and torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   torch_cuda=torch.version.cuda)
    return out


def check_parity(device: torch.device, tokens: int) -> dict:
    """fp32 logits and bf16 greedy tokens of the in-process model against transformers'. The bf16 run is
    reported, not judged: transformers rounds its gate weights to bf16 where this project keeps them in
    fp32, so near-ties may legitimately go another way."""
    from moe_service.checkpoint import load_model
    from moe_service.engine.engine import Engine
    from moe_service.engine.sampling import SamplingParams
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
        first = next((i for i, (a, b) in enumerate(zip(got_ids, want_ids)) if a != b), None)
        out.update(bf16_tokens=tokens, bf16_first_differing_position=first)
    return out


def _random_experts(E: int, D: int, inter: int, device: torch.device, dtype: torch.dtype, seed: int):
    from moe_service.model.experts import RoutedExperts

    torch.manual_seed(seed)
    experts = RoutedExperts(E, D, inter)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    return experts.to(device=device, dtype=dtype)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_grouped_gemm(device: torch.device, dims: dict) -> dict:
    """The routed experts' grouped path against the per-expert loop, and both timed, in the serving dtype."""
    dtype = _dtype(device)
    E, D, inter, K = dims["experts"], dims["hidden"], dims["inter"], dims["top_k"]
    experts = _random_experts(E, D, inter, device, dtype, 3)
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


def check_fp8_experts(device: torch.device, dims: dict) -> dict:
    """FP8 routed experts (DeepSeek-V3's 128 x 128 blocks, dequantized per expert, computed in the serving
    dtype) against the same experts in that dtype: the difference and the time of each, and the ratio."""
    from moe_service.model.experts import group_pairs
    from moe_service.model.fp8 import FP8Experts

    dtype = _dtype(device)
    E, D, inter, K = dims["experts"], dims["hidden"], dims["inter"], dims["top_k"]
    dense = _random_experts(E, D, inter, device, dtype, 5)
    fp8 = FP8Experts.from_dense(dense)
    reference = _random_experts(E, D, inter, device, dtype, 5)  # the dequantized weights, dense
    with torch.no_grad():
        for s in range(E):
            gate_up, down = fp8.weights(s)
            reference.gate_up_proj[s].copy_(gate_up)
            reference.down_proj[s].copy_(down)
    timer = Timer(device)
    out = {"dtype": str(dtype).removeprefix("torch."), "batches": {}}
    for T in dims["batches"]:
        x = torch.randn(T, D, device=device, dtype=dtype)
        ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)])
        g = group_pairs(torch.rand(T, K, device=device), ids, E)
        got, want = fp8.run(x, g), reference.run(x, g)
        rel = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
        t_fp8, t_dense = timer.median(lambda: fp8.run(x, g)), timer.median(lambda: dense.run(x, g))
        out["batches"][T] = {"relative_difference_to_dequantized": rel, "fp8_s": t_fp8, "dense_s": t_dense,
                             "fp8_vs_dense": t_fp8 / t_dense}
    return out


def check_promotion(device: torch.device, dims: dict) -> dict:
    """`standby: host`: what a worker's first call to a parked standby pays, once per layer: the layer's
    standbys (a quarter of its experts here, pinned host memory) joined to its module on the device; and the
    joined module's answer against the same experts resident from the start."""
    from moe_service.serving.worker.servicer import HostedLayer

    dtype = _dtype(device)
    E, D, inter, K = dims["experts"], dims["hidden"], dims["inter"], dims["top_k"]
    parked_n = E // 4
    everything = _random_experts(E, D, inter, device, dtype, 11)
    out = {"dtype": str(dtype).removeprefix("torch."), "parked_experts": parked_n, "runs": []}
    for _ in range(3):
        serving = _random_experts(E - parked_n, D, inter, device, dtype, 0)
        parked = _random_experts(parked_n, D, inter, torch.device("cpu"), dtype, 0)
        with torch.no_grad():
            serving.gate_up_proj.copy_(everything.gate_up_proj[: E - parked_n])
            serving.down_proj.copy_(everything.down_proj[: E - parked_n])
            parked.gate_up_proj.copy_(everything.gate_up_proj[E - parked_n:])
            parked.down_proj.copy_(everything.down_proj[E - parked_n:])
            if device.type == "cuda":
                for p in parked.parameters():
                    p.data = p.data.pin_memory()
        layer = HostedLayer.build(serving, list(range(E - parked_n)), E, parked, list(range(E - parked_n, E)))
        seconds = layer.promote(torch.tensor([E - 1]))
        out["runs"].append(seconds)
    nbytes = sum(p.numel() * p.element_size() for p in parked.parameters())
    x = torch.randn(8, D, device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(8)])
    w = torch.rand(8, K, device=device)
    got, want = layer.experts(x, w, ids), everything(x, w, ids)
    out.update(parked_bytes=nbytes, promotion_s=statistics.median(out["runs"]),
               gb_per_s=nbytes / statistics.median(out["runs"]) / 1e9,
               max_difference=float((got.float() - want.float()).abs().max()))
    return out


def _server(queue, device: str, dims: dict, seed: int) -> None:
    """An expert gRPC server holding layer 1's experts on `device`, and a stream echo beside it."""
    import grpc

    from moe_service.bench.transport_bench import _start_echo
    from moe_service.serving.worker.servicer import ExpertServicer, HostedLayer
    from moe_service.transport.options import grpc_options
    from moe_service.transport.server import expert_handlers

    async def main() -> None:
        module = _random_experts(dims["experts"], dims["hidden"], dims["inter"], torch.device(device),
                                 _dtype(torch.device(device)), seed)
        servicer = ExpertServicer({1: HostedLayer.build(module, list(range(dims["experts"])), dims["experts"])},
                                  worker_id="gpu-check", hidden_size=dims["hidden"], num_experts=dims["experts"])
        server = grpc.aio.server(options=grpc_options())
        server.add_generic_rpc_handlers((expert_handlers(servicer),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _, echo_port = await _start_echo(256 << 20)
        queue.put((f"127.0.0.1:{port}", echo_port))
        await asyncio.Event().wait()

    asyncio.run(main())


class ExpertServerProcess:
    """The server of `_server` in a process of its own; one that dies is seen at once, with its exit code."""

    def __init__(self, device: torch.device, dims: dict, seed: int = 11) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.queue = ctx.Queue()
        self.proc = ctx.Process(target=_server, args=(self.queue, device.type, dims, seed), daemon=True)
        self.proc.start()
        self.address: str | None = None
        self.echo_port = 0

    def ready(self, timeout_s: float = SERVER_START_S) -> tuple[str, int]:
        import queue

        deadline = time.monotonic() + timeout_s
        while self.address is None:
            self.alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the expert server did not start within {timeout_s:.0f} s")
            try:
                self.address, self.echo_port = self.queue.get(timeout=0.5)
            except queue.Empty:
                pass
        return self.address, self.echo_port

    def alive(self) -> None:
        if not self.proc.is_alive():
            raise RuntimeError(f"the expert server process died (exit code {self.proc.exitcode})")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join(10)


def check_expert_server(device: torch.device, dims: dict, server: ExpertServerProcess) -> dict:
    """Experts on `device` in a server process, called on a persistent stream as a gateway calls them."""
    from moe_service.bench.transport_bench import StreamEcho, alternating
    from moe_service.transport import fastwire
    from moe_service.transport.expert_client import ExpertStreams

    address, echo_port = server.ready()
    dtype = _dtype(device)
    local = _random_experts(dims["experts"], dims["hidden"], dims["inter"], device, dtype, 11)  # the server's
    out: dict = {"batches": {}}
    streams, echo = ExpertStreams(), StreamEcho([echo_port])
    try:
        for T in dims["batches"]:
            x = torch.randn(T, dims["hidden"], dtype=dtype)
            e = torch.stack([torch.randperm(dims["experts"])[: dims["top_k"]] for _ in range(T)]).to(torch.int32)
            w = torch.rand(T, dims["top_k"])

            def call():
                seq = streams.next_seq()
                payload = fastwire.encode_request(1, x, e, w, seq=seq, deadline_s=CALL_TIMEOUT_S)
                deadline = time.monotonic() + CALL_TIMEOUT_S
                sent = streams.send([(address, payload, seq, (dtype, (T, dims["hidden"])))], deadline)
                answer = streams.receive(sent)[0]
                if not isinstance(answer, fastwire.Response):
                    server.alive()
                    raise RuntimeError(f"the expert server answered {answer}")
                return answer

            answer = call()
            want = local(x.to(device), w.to(device), e.to(device)).float().cpu()
            rel = float((answer.output.float() - want).norm() / want.norm().clamp_min(1e-12))
            blob = fastwire.encode_request(1, x, e, w, seq=1, deadline_s=CALL_TIMEOUT_S)
            rtts, computes, floors = alternating(lambda: call().compute_seconds, echo, blob, 45, warmup=5)
            rtt, compute, floor = (statistics.median(v) for v in (rtts, computes, floors))
            out["batches"][T] = {"relative_difference": rel, "round_trip_s": rtt, "worker_compute_s": compute,
                                 "transport_s": rtt - compute, "stream_echo_s": floor,
                                 "transport_vs_echo": (rtt - compute) / floor}
    finally:
        streams.close()
        echo.close()
    return out


def check_remote_experts(device: torch.device, dims: dict, server: ExpertServerProcess) -> dict:
    """The gateway's path with inputs on `device`: a dispatcher's layer call stages them to the host, plans,
    sends, and brings the answer back (T x top_k pairs: 6 for one row, 1536 for 256)."""
    from moe_service.routing import LayerRoutes
    from moe_service.serving.gateway.remote import RemoteExperts, RoutingTable

    address, _ = server.ready()
    dtype = _dtype(device)
    local = _random_experts(dims["experts"], dims["hidden"], dims["inter"], device, dtype, 11)  # the server's
    E, K = dims["experts"], dims["top_k"]
    table = RoutingTable(1, {1: LayerRoutes(1, [[0]] * E)}, {0: address})
    # on a CPU dry run the host tensors are staged all the same, so the copies' logic runs there too
    remote = RemoteExperts(table, call_timeout_s=CALL_TIMEOUT_S, table_wait_s=1.0, stage_always=device.type == "cpu")
    d = remote.dispatcher()
    timer = Timer(device)
    out: dict = {"batches": {}}
    try:
        for T in (1, 256):
            x = torch.randn(T, dims["hidden"], device=device, dtype=dtype)
            scores = torch.rand(T, E, device=device)
            w, e = scores.topk(K, dim=-1)
            got = d.run(1, x, w, e, deadline=time.monotonic() + CALL_TIMEOUT_S)
            want = local(x, w, e)
            rel = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
            t = timer.median(lambda: d.run(1, x, w, e, deadline=time.monotonic() + CALL_TIMEOUT_S), repeats=20)
            out["batches"][T] = {"pairs": T * K, "answer_device": str(got.device), "relative_difference": rel,
                                 "s": t}
    finally:
        remote.close()
    return out


def check_layer_timings(device: torch.device, dims: dict) -> dict:
    """A DeepSeek-V2-Lite-shaped stack (real dimensions, `layers` layers): a decode step over a 512-token
    context timed as it runs, then per MoE layer its attention, gate, shared and routed experts, each
    timed apart (synchronising around every part, which the step's own time must not include)."""
    from moe_service.model.args import ModelArgs
    from moe_service.model.cache import PagedLatentCache
    from moe_service.model.transformer import Transformer

    dtype = _dtype(device)
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

    modules = [(name, module) for layer in model.layers if layer.is_moe
               for name, module in (("attention", layer.self_attn), ("gate", layer.mlp.gate),
                                    ("shared_experts", layer.mlp.shared_experts), ("routed_experts", layer.mlp.experts))]
    out = {"model": dict(dims["model"]), "dtype": str(dtype).removeprefix("torch."),
           "context_tokens": dims["context"], "batches": {}}
    for B in dims["batches"]:
        cache = PagedLatentCache.for_rows(args, B, dims["context"] + 8, dtype=dtype, device=device)
        ids = torch.randint(3, args.vocab_size, (B, 1), device=device)
        start = torch.full((B,), dims["context"], device=device)
        with torch.inference_mode():
            step = timer.median(lambda: model(ids, cache=cache, start=start, last_only=True), repeats=5)
            handles = []
            for name, module in modules:
                pre, post = timed(name)
                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
            try:
                for v in parts.values():
                    v.clear()
                model(ids, cache=cache, start=start, last_only=True)
            finally:
                for h in handles:
                    h.remove()
        out["batches"][B] = {"decode_step_s": step, **{f"{k}_s_per_layer": statistics.median(v)
                                                        for k, v in parts.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="default: $OUT/gpu_check.json when OUT is set, else gpu_check.json")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run at small shapes")
    ns = p.parse_args(argv)
    out = Path(ns.out) if ns.out else Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") \
        else Path("gpu_check.json")
    device = torch.device(ns.device)
    report = Report(out)
    report.set("environment", environment(device))
    report.set("budget_s", BUDGET_S)

    def interrupted(signum, _frame):  # the caller's limit: say where it struck, keep what is done
        report.set("interrupted", f"signal {signum} after {time.monotonic() - t_start:.0f} s")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    if device.type == "cuda" and not torch.cuda.is_available():
        report.set("skipped", "no CUDA device on this machine: nothing to check")
        print(report.data["skipped"])
        return 0
    if device.type == "cuda":
        lite = dict(num_hidden_layers=4, vocab_size=102400, max_position_embeddings=4096)  # V2-Lite's dims
        dims = {"experts": 64, "hidden": 2048, "inter": 1408, "top_k": 6, "batches": [1, 32, 256],
                "model": lite, "context": 512, "parity_tokens": 32}
    else:  # a dry run: the same code at sizes a CPU finishes in seconds
        small = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, kv_lora_rank=64,
                     qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=512,
                     moe_intermediate_size=128, n_routed_experts=16, vocab_size=1000, max_position_embeddings=512)
        dims = {"experts": 16, "hidden": 256, "inter": 128, "top_k": 4, "batches": [1, 8], "model": small,
                "context": 64, "parity_tokens": 8}
    server = ExpertServerProcess(device, dims)  # starts now: its CUDA start-up overlaps the first checks
    checks = {
        "parity": lambda: check_parity(device, dims["parity_tokens"]),
        "grouped_gemm": lambda: check_grouped_gemm(device, dims),
        "expert_server": lambda: check_expert_server(device, dims, server),
        "remote_experts": lambda: check_remote_experts(device, dims, server),
        "fp8_experts": lambda: check_fp8_experts(device, dims),
        "promotion": lambda: check_promotion(device, dims),
        "layer_timings": lambda: check_layer_timings(device, dims),
    }
    failed = False
    try:
        for name, fn in checks.items():
            left = BUDGET_S - (time.monotonic() - t_start)
            if device.type == "cuda" and left < EXPECTED_S[name]:
                report.set(name, {"skipped": f"{left:.0f} s of the budget left; it takes about {EXPECTED_S[name]} s"})
                continue
            t0 = time.perf_counter()
            print(f"[gpu check] {name} ...", file=sys.stderr, flush=True)
            try:
                result = fn()
            except Exception:  # recorded: the other checks still run
                result = {"error": traceback.format_exc()}
                failed = True
            result["seconds"] = time.perf_counter() - t0
            report.set(name, result)
    finally:
        server.stop()
    print(json.dumps(report.data, indent=2, default=str))
    print(f"results: {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
