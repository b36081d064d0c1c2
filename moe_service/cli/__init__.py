"""The `moe-service` command."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from moe_service.model.args import DTYPES


def _model_source(ns: argparse.Namespace) -> str:
    return ns.model or ns.preset


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="a local Hugging Face DeepSeek-V2 directory (config.json, *.safetensors)")
    g.add_argument("--preset", default="coder", help="a built-in model: coder (default: trained, embedded; "
                   "docs/models.md), tiny or bench (random weights, for tests and benchmarks)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def _sampling(ns: argparse.Namespace):
    from moe_service.engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p,
                          top_k=ns.top_k, seed=ns.seed, stop_strings=tuple(ns.stop))


def cmd_info(ns: argparse.Namespace) -> int:
    from moe_service.checkpoint import open_source
    from moe_service.model.summary import format_summary, summarize

    s = summarize(open_source(_model_source(ns)).args, DTYPES[ns.dtype])
    print(json.dumps(s, indent=2) if ns.json else format_summary(s))
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"--token-ids expects integers separated by spaces or commas, got {text!r}")


def cmd_generate(ns: argparse.Namespace) -> int:
    params = _sampling(ns)
    if ns.address:
        from moe_service.client import Client

        with Client(ns.address, api_key=ns.api_key) as client:
            kwargs = {"token_ids": _parse_ids(ns.token_ids)} if ns.token_ids else {"prompt": ns.prompt}
            for piece in client.generate(**kwargs, params=params):
                if piece.text:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
                if piece.finish_reason:
                    print(f"\n[finish: {piece.finish_reason}; {piece.usage}]", file=sys.stderr)
        return 0
    from moe_service.checkpoint import load_model
    from moe_service.engine.engine import Engine
    from moe_service.engine.tokenizer import load_tokenizer

    source = _model_source(ns)
    model = load_model(source, dtype=DTYPES[ns.dtype], progress=True)
    tok = load_tokenizer(source, model.args)
    ids = _parse_ids(ns.token_ids) if ns.token_ids else tok.encode(ns.prompt or "")
    for step in Engine(model, tok).stream([ids], params):
        sys.stdout.write(step.piece if not ns.ids else f"{step.token} ")
        sys.stdout.flush()
        if step.finish_reason:
            print(f"\n[finish: {step.finish_reason}]", file=sys.stderr)
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from moe_service.bench.common import save_results

    if ns.what == "model":
        from moe_service.bench import model_bench as b

        r = b.run(ns.preset, threads=ns.threads, repeats=ns.repeats)
    elif ns.what == "transport":
        from moe_service.bench import transport_bench as b

        r = b.run()
    elif ns.what == "served" and ns.overload:
        from moe_service.bench import overload as b

        r = b.run(ns.preset, workers=ns.workers, out_dir=ns.out)
    elif ns.what == "served":
        from moe_service.bench import served_bench as b

        r = b.run(ns.preset, workers=ns.workers, repeats=ns.repeats, micro_batches=ns.micro_batches)
    elif ns.what == "simulated":
        from moe_service.bench import simulated_bench as b

        r = b.run_phases(workers=ns.workers if ns.workers != 2 else 8)
    elif ns.what == "placement":
        from moe_service.bench import placement_bench as b

        r = b.run(ns.preset, workers=ns.workers if ns.workers != 2 else 4, repeats=ns.repeats + 2)
    elif ns.what == "projection":
        from moe_service.bench import projection as b

        r = b.run()
    elif ns.what == "skewed":
        from moe_service.bench import skewed_bench as b

        # the trained model's own routing is skewed; a random preset's is made so by its "-skewed" twin
        skewed = ns.preset if ns.preset.endswith("-skewed") or ns.preset == "coder" else ns.preset + "-skewed"
        r = b.run(skewed, workers=ns.workers,
                  out_dir=ns.out)
    print(b.format_results(r))
    print(f"results: {save_results('overload' if getattr(ns, 'overload', False) else ns.what, r, ns.out)}")
    return 0


def shared_gpus(workers: int, gpus: int) -> float:
    """GPUs for each of `workers` expert workers and one gateway replica out of `gpus`: one each where
    there are enough, else an even share (a Ray fraction, which must fit on one GPU), 0 (the CPU) where
    there are none."""
    users = workers + 1
    if gpus <= 0:
        return 0.0
    if gpus >= users:
        return 1.0
    per_gpu = -(-users // gpus)
    return math.floor(10_000 / per_gpu) / 10_000  # Ray keeps 4 decimals; never round up past one GPU


def _gpu_settings(ns: argparse.Namespace) -> tuple[float, float]:
    """(gpus_per_worker, gateway_gpus): as given, else from the GPUs there are. Locally: this host's.
    On a cluster (--ray-address, Ray already connected): the cluster's, where every worker and the gateway
    get a whole GPU or none exist; anything in between is a choice for the operator."""
    if ns.gpus_per_worker is not None and ns.gateway_gpus is not None:
        return ns.gpus_per_worker, ns.gateway_gpus
    if ns.ray_address:
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        if 0 < gpus < ns.workers + 1:
            raise ValueError(f"the cluster has {gpus} GPU(s) for {ns.workers} expert worker(s) and a gateway replica: "
                             "say how to share them with --gpus-per-worker and --gateway-gpus (fractions allowed)")
        if gpus == 0:
            print("the cluster has no GPUs now: workers and gateway run on CPUs (an autoscaling cluster adds GPU "
                  "nodes only when asked: --gpus-per-worker 1 --gateway-gpus 1)", file=sys.stderr, flush=True)
    else:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    auto = shared_gpus(ns.workers, gpus)
    return (auto if ns.gpus_per_worker is None else ns.gpus_per_worker,
            auto if ns.gateway_gpus is None else ns.gateway_gpus)


def _service_config(ns: argparse.Namespace) -> dict:
    """The service settings the command line asks for; with --ray-address, Ray is connected already."""
    from moe_service.serving.config import overlap_pays

    gpus, gateway_gpus = _gpu_settings(ns)
    cfg = {"model": _model_source(ns), "dtype": ns.dtype, "workers": ns.workers, "gpus_per_worker": gpus,
           "gateway_gpus": gateway_gpus, "http_api": not ns.no_http_api,
           "redundant_experts": ns.redundant_experts, "api_key": ns.api_key,
           "gateway_num_cpus": ns.gateway_cpus, "sd_port": ns.sd_port,
           # shared experts and a second micro-batch overlap the expert calls unless CPU workers share a
           # few cores with the gateway
           "overlap_shared_experts": overlap_pays(gpus > 0),
           "scheduler": {"micro_batches": 2 if overlap_pays(gpus > 0) else 1},
           # on a cluster workers advertise their node IP; a local run stays on loopback
           "expert_bind_host": ns.expert_host or (None if ns.ray_address else "127.0.0.1")}
    if ns.replicas_per_worker:
        cfg["replicas_per_worker"] = ns.replicas_per_worker
    return cfg


def cmd_serve(ns: argparse.Namespace) -> int:
    import signal
    import threading

    import ray

    from moe_service.serving.config import ServiceConfig
    from moe_service.serving.local import check_cluster_auth, start_service
    from moe_service.serving.proxy_limits import RUNTIME_ENV as PROXY_RUNTIME_ENV

    if ns.ray_address:
        check_cluster_auth(ns.ray_address)  # fails at once, naming RAY_AUTH_MODE and the token
        ray.init(address=ns.ray_address, namespace="moe_service", runtime_env=PROXY_RUNTIME_ENV)
    else:  # always a Ray of its own, whatever cluster an earlier `ray start` left recorded
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 namespace="moe_service", runtime_env=PROXY_RUNTIME_ENV)
    try:
        config = _service_config(ns)
    except ValueError:
        ray.shutdown()
        raise
    print(f"starting {config['workers']} expert worker(s) and the gateway for {config['model']!r} ...", flush=True)
    svc = start_service(config, grpc_port=ns.port, http_port=ns.http_port, host=ns.host)
    print(f"gRPC (moe.v1.Inference, grpc.health.v1.Health): {ns.host}:{svc.grpc_port}", flush=True)
    if not ns.no_http_api:
        print(f"OpenAI HTTP API: http://{ns.host}:{svc.http_port}/v1   (model "
              f"{ServiceConfig.from_dict(config).model_name()!r}; docs/api.md)", flush=True)
    sd = ray.get(svc.controller().http_address.remote())
    print(f"metrics: every process serves /metrics; Prometheus http_sd_configs url: http://{sd}/targets", flush=True)
    print(f"operators: moe-service stats --controller {sd}   (also: placement, rebalance --dry-run)", flush=True)
    if not ns.demo:
        print(f"try:  moe-service generate --address {ns.host}:{svc.grpc_port} \"hello\"", flush=True)
    if ns.demo:
        _demo_generation(svc.address, ns.api_key)
        if not ns.no_http_api:
            _demo_http(f"{ns.host}:{svc.http_port}", ServiceConfig.from_dict(config).model_name(), ns.api_key)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if not ns.demo:
        stop.wait()
    print("shutting down ...", flush=True)
    svc.shutdown()
    ray.shutdown()
    return 0


DEMO_PROMPT = "def fibonacci(n):"


def _demo_generation(address: str, api_key: str | None) -> None:
    from moe_service.client import Client

    prompt = DEMO_PROMPT
    with Client(address, api_key=api_key) as client:
        info = client.model_info()
        print(f"\nmodel {info.name}: {info.layers} layers, {info.routed_experts_per_layer} routed experts "
              f"(top-{info.experts_per_token}) on {info.expert_workers} expert workers")
        print(f"prompt: {prompt!r}\nstreamed over gRPC: ", end="", flush=True)
        for tok in client.generate(prompt, max_new_tokens=48):
            if tok.finish_reason:
                print(f"\n[finish: {tok.finish_reason}, {tok.usage['generated_tokens']} tokens, "
                      f"time to first token {tok.usage['time_to_first_token_s'] * 1e3:.0f} ms]", flush=True)
            else:
                print(tok.text, end="", flush=True)


def _demo_http(address: str, model: str, api_key: str | None) -> None:
    """The same service through its OpenAI API, as curl would call it."""
    import urllib.request

    body = {"model": model, "prompt": DEMO_PROMPT, "max_tokens": 48, "temperature": 0}
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(f"http://{address}/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    print(f"over the OpenAI HTTP API (POST http://{address}/v1/completions): {out['choices'][0]['text']!r} "
          f"[finish: {out['choices'][0]['finish_reason']}, usage {out['usage']}]", flush=True)


def cmd_experts(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_service.checkpoint import load_model
    from moe_service.coder.specialisation import format_table, held_out_sample, plot, specialisation
    from moe_service.engine.tokenizer import HFTokenizer, load_tokenizer

    source = _model_source(ns)
    model = load_model(source, dtype=DTYPES[ns.dtype])
    tok = load_tokenizer(source, model.args)
    if not isinstance(tok, HFTokenizer):
        print(f"{source!r} has no tokenizer.json: token classes need text (try --preset coder)", file=sys.stderr)
        return 2
    text = Path(ns.text).read_text() if ns.text else held_out_sample()
    r = specialisation(model, tok, text)
    print(format_table(r))
    if ns.json:
        Path(ns.json).write_text(json.dumps(r))
    plot(r, Path(ns.png))
    print(f"\nheat map: {ns.png}")
    return 0


def cmd_calibrate(ns: argparse.Namespace) -> int:
    from moe_service.bench.placement_bench import calibrate

    calibrate(threads=ns.threads)
    return 0


def cmd_simulate(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_service.capacity import simulate
    from moe_service.capacity.costmodel import device

    dev = device(ns.device)
    r = simulate.run(ns.model_config, dev, ns.gateways, ns.workers, ns.streams, ns.trace, ns.rtt_us * 1e-6,
                     ns.context, software_s=ns.software_us * 1e-6)
    print(simulate.format_results(r))
    if ns.json:
        Path(ns.json).write_text(json.dumps(r, indent=2))
    if ns.png:
        simulate.plot(ns.model_config, dev, ns.gateways, ns.streams, ns.trace, Path(ns.png))
        print(f"plots (simulated): {ns.png}")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    import dataclasses

    from moe_service.coder.train import CODER_DIR, TrainConfig, train

    cfg = TrainConfig()
    if ns.tokens:
        cfg = dataclasses.replace(cfg, tokens=ns.tokens)
    train(ns.out or CODER_DIR, cfg, log=lambda m: print(m, file=sys.stderr, flush=True),
          loss_png=ns.loss_png or ("docs/coder-loss.png" if ns.out is None else None))
    return 0


def cmd_placement(ns: argparse.Namespace) -> int:
    from moe_service.cli.views import fetch, format_hottest, format_placement

    s = fetch(ns.controller, "/stats", timeout=10)
    print(json.dumps(s, indent=2) if ns.json else f"{format_placement(s)}\n\n{format_hottest(s)}")
    return 0


def cmd_rebalance(ns: argparse.Namespace) -> int:
    from moe_service.cli.views import fetch, format_rebalance

    r = fetch(ns.controller, "/rebalance" + ("?dry_run=1" if ns.dry_run else ""), method="POST",
              api_key=ns.api_key or os.environ.get("MOE_SERVICE_ADMIN_API_KEY") or os.environ.get("MOE_SERVICE_API_KEY"))
    print(json.dumps(r, indent=2) if ns.json else format_rebalance(r))
    return 0


def cmd_stats(ns: argparse.Namespace) -> int:
    from moe_service.cli.views import stats_screen

    stats_screen(ns.controller, ns.interval, ns.iterations)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-service", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    info = sub.add_parser("info", help="architecture summary: parameters, experts, KV bytes per token")
    _add_model_args(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(fn=cmd_info)

    gen = sub.add_parser("generate", help="generate text, in-process or from a running service (--address)")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("prompt", nargs="?", default="")
    gen.add_argument("--token-ids", help="the prompt as token ids instead of text, e.g. '1 72 101'")
    gen.add_argument("--ids", action="store_true", help="print token ids instead of text")
    gen.add_argument("--address", help="HOST:PORT of a running service; default: run the model in this process")
    gen.add_argument("--api-key", default=None)
    gen.add_argument("--n", type=int, default=1, help="with --address: samples of the prompt (seed i+k for sample k)")
    gen.add_argument("--logprobs", type=int, default=None,
                     help="with --address: print each token's log-probability and this many alternatives")
    gen.add_argument("--request-id", default=None, help="with --address: an id the service echoes back")
    gen.set_defaults(fn=cmd_generate)

    ex = sub.add_parser("experts", help="which experts each kind of Python token chooses, per MoE layer "
                        "(a table and a heat map)")
    _add_model_args(ex)
    ex.add_argument("--text", default=None, help="a Python file to run (default: the coder model's held-out files)")
    ex.add_argument("--png", default="experts.png", help="where to write the heat map")
    ex.add_argument("--json", default=None, help="also write the shares as JSON here")
    ex.set_defaults(fn=cmd_experts)

    cal = sub.add_parser("calibrate", help="measure this CPU for the cost model (bandwidth, FLOP/s, per-call cost)")
    cal.add_argument("--threads", type=int, default=1, help="threads, as one expert worker computes (default 1)")
    cal.set_defaults(fn=cmd_calibrate)

    sim = sub.add_parser("simulate", help="SIMULATED capacity planning with the cost model: tokens/s and ITL of "
                         "a cluster for a placement policy (no Ray, no gRPC)")
    sim.add_argument("--model-config", default="DeepSeek-V2", help="a preset, a checkpoint directory, a config.json, "
                     "or DeepSeek-V2 / DeepSeek-V2-Lite (shapes only)")
    sim.add_argument("--device", default="H200", help="H100, H200 (datasheets) or cpu (after moe-service calibrate)")
    sim.add_argument("--gateways", type=int, default=1)
    sim.add_argument("--workers", type=int, default=8)
    sim.add_argument("--streams", type=int, default=64, help="decode streams per gateway")
    sim.add_argument("--context", type=int, default=2048, help="tokens per stream in the KV cache")
    sim.add_argument("--trace", default="zipf:1.2", help="zipf:EXPONENT, or a JSON load window [layers, experts]")
    sim.add_argument("--rtt-us", type=float, default=50.0, help="network round trip per layer call")
    sim.add_argument("--software-us", type=float, default=0.0,
                     help="the dispatch software's own cost per layer call (bench served measures it)")
    sim.add_argument("--json", default=None)
    sim.add_argument("--png", default=None, help="also draw throughput vs workers, before/after a rebalance, "
                     "token vs time placement")
    sim.set_defaults(fn=cmd_simulate)

    tr = sub.add_parser("train", help="train the embedded `coder` model on this Python's standard library "
                        "(about 20 minutes on 2 cores; docs/models.md)")
    tr.add_argument("--out", default=None, help="checkpoint directory (default: the embedded one, moe_service/models/coder)")
    tr.add_argument("--tokens", type=int, default=None, help="the token budget (default: the recorded run's)")
    tr.add_argument("--loss-png", default=None, help="the loss curve (default: docs/coder-loss.png for the "
                    "embedded checkpoint, else OUT/loss.png)")
    tr.set_defaults(fn=cmd_train)

    bench = sub.add_parser("bench", help="benchmarks (results printed and written under --out)")
    bench.add_argument("what", choices=["model", "transport", "served", "skewed", "placement", "simulated",
                                          "projection"],
                       help="model: this model vs transformers; transport: RunExperts vs a raw gRPC echo; served: the "
                            "service vs in-process, and 1/8/32 clients; skewed: throughput before/after rebalancing; "
                            "placement: time-aware vs token-balanced placement, measured per worker on this CPU; simulated: "
                            "a live SIMULATED cluster (8 H200 workers) before/after a rebalance, against simulate; "
                            "projection: a decode step of DeepSeek-V2(-Lite) on H100/H200, on paper")
    bench.add_argument("--workers", type=int, default=2)
    bench.add_argument("--preset", default="bench")
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--out", default="bench-results")
    bench.add_argument("--overload", action="store_true", help="served: bursts at 1x, 2x, 4x and 8x capacity "
                       "instead (use --preset tiny): goodput, refusals, latency, memory, a plot")
    bench.add_argument("--micro-batches", type=int, default=None, help="served: the scheduler's micro_batches "
                       "(default: the service's)")
    bench.set_defaults(fn=cmd_bench)

    for name, fn, help_text in (
        ("placement", cmd_placement, "the current placement, per-worker load and the hottest experts"),
        ("rebalance", cmd_rebalance, "re-plan the placement from the load window and apply it (or --dry-run)"),
        ("stats", cmd_stats, "a live terminal view of per-worker load and the hottest experts"),
    ):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--controller", "--address", dest="controller", default="127.0.0.1:9095",
                        help="the controller's HTTP address (printed by `moe-service serve`)")
        sp.add_argument("--json", action="store_true")
        if name == "rebalance":
            sp.add_argument("--dry-run", action="store_true", help="print the plan and its balancedness only")
            sp.add_argument("--api-key", default=None, help="the admin key (default: $MOE_SERVICE_ADMIN_API_KEY, "
                            "else $MOE_SERVICE_API_KEY)")
        if name == "stats":
            sp.add_argument("--interval", type=float, default=2.0)
            sp.add_argument("--iterations", type=int, default=None, help="frames to draw (default: until Ctrl-C)")
        sp.set_defaults(fn=fn)

    for name, help_text, demo in (
        ("serve", "start Ray (or join --ray-address), deploy gateway + expert workers, serve until Ctrl-C", False),
        ("demo", "the README's first command: serve the embedded default, stream one generation, stop", True),
    ):
        sp = sub.add_parser(name, help=help_text)
        _add_model_args(sp)
        sp.add_argument("--workers", type=int, default=2, help="expert worker actors")
        sp.add_argument("--gpus-per-worker", type=float, default=None,
                        help="default: 1 where there is a GPU for every worker and the gateway, an even share of "
                        "this host's GPUs where fewer, 0 where none (with --ray-address: the cluster's)")
        sp.add_argument("--gateway-gpus", type=float, default=None,
                        help="GPUs per gateway replica (attention, KV cache, sampling); default: as --gpus-per-worker")
        sp.add_argument("--replicas-per-worker", type=int, default=None, help="expert replicas per layer per worker")
        sp.add_argument("--redundant-experts", type=int, default=0, help="experts per layer to replicate at start")
        sp.add_argument("--port", type=int, default=0 if demo else 9000, help="client gRPC port (0: a free one)")
        sp.add_argument("--http-port", type=int, default=0 if demo else 8000,
                        help="the OpenAI HTTP API's port (0: a free one)")
        sp.add_argument("--no-http-api", action="store_true",
                        help="gRPC only: no OpenAI HTTP API (Serve's ASGI ingress slows every request; docs/api.md)")
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--sd-port", type=int, default=0 if demo else 9095,
                        help="controller HTTP: Prometheus http_sd /targets, /stats, /rebalance")
        sp.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
        sp.add_argument("--api-key", default=None, help="require 'authorization: Bearer KEY' from clients")
        sp.add_argument("--gateway-cpus", type=float, default=0.0 if demo else 1.0)
        sp.add_argument("--expert-host", default=None, help="address expert workers bind; default: loopback, "
                        "or the node IP with --ray-address")
        sp.set_defaults(fn=cmd_serve, demo=demo)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.fn(ns)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from moe_service.serving.local import ClusterAuthError

        if not isinstance(e, ClusterAuthError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
