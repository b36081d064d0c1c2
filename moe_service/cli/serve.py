"""`moe-service serve` and `demo`: how many GPUs to ask Ray for, deploying, and the demo's two clients."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from moe_service.cli.common import add_model_args, model_source


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
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    auto = shared_gpus(ns.workers, gpus)
    return (auto if ns.gpus_per_worker is None else ns.gpus_per_worker,
            auto if ns.gateway_gpus is None else ns.gateway_gpus)


def _service_config(ns: argparse.Namespace) -> dict:
    """The service settings the command line asks for; with --ray-address, Ray is connected already."""
    gpus, gateway_gpus = _gpu_settings(ns)
    cfg = {"model": model_source(ns), "dtype": ns.dtype, "workers": ns.workers, "gpus_per_worker": gpus,
           "gateway_gpus": gateway_gpus, "http_api": not ns.no_http_api,
           "redundant_experts": ns.redundant_experts, "min_replicas": ns.min_replicas, "standby": ns.standby,
           "api_key": ns.api_key, "quantize": ns.quantize,
           "gateway_num_cpus": ns.gateway_cpus, "sd_port": ns.sd_port,
           # on a cluster workers advertise their node IP; a local run stays on loopback
           "expert_bind_host": ns.expert_host or (None if ns.ray_address else "127.0.0.1")}
    if ns.replicas_per_worker:
        cfg["replicas_per_worker"] = ns.replicas_per_worker
    if ns.speculative:
        cfg["speculative"] = {"method": "mtp", "tokens": ns.speculative}
    if ns.ray_address:
        # a cluster whose node groups declare the roles (cluster/, k8s/) gets each part where it declares it:
        # by GPUs alone, Ray may put the gateway on a worker node and push a worker onto the head
        import ray

        declared = ray.cluster_resources()
        for key, resource in (("worker_resources", "expert_worker"), ("gateway_resources", "gateway")):
            if declared.get(resource, 0) > 0:
                cfg[key] = {resource: 1}
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
    front = None
    if ns.front:  # HAProxy takes the client port; Serve's gRPC proxy listens on loopback behind it
        from moe_service.serving.front import HAProxyFront, gateway_capacity, haproxy_binary
        from moe_service.serving.local import free_port

        haproxy_binary()  # fails now, not after the workers have loaded
        svc = start_service(config, grpc_port=free_port(), http_port=ns.http_port, host=ns.host)
        front = HAProxyFront(f"127.0.0.1:{svc.grpc_port}", gateway_capacity(ServiceConfig.from_dict(config)),
                             listen=f"{ns.host}:{ns.port or free_port()}")
        address = front.address
    else:
        svc = start_service(config, grpc_port=ns.port, http_port=ns.http_port, host=ns.host)
        address = f"{ns.host}:{svc.grpc_port}"
    print(f"gRPC (moe.v1.Inference, grpc.health.v1.Health): {address}"
          + (" (HAProxy in front: refusals before Python)" if front else ""), flush=True)
    if not ns.no_http_api:
        print(f"OpenAI HTTP API: http://{ns.host}:{svc.http_port}/v1   (model "
              f"{ServiceConfig.from_dict(config).model_name()!r}; docs/api.md)", flush=True)
    sd = ray.get(svc.controller().http_address.remote())
    print(f"metrics: every process serves /metrics; Prometheus http_sd_configs url: http://{sd}/targets", flush=True)
    print(f"operators: moe-service stats --controller {sd}   (also: placement, rebalance --dry-run)", flush=True)
    if not ns.demo:
        print(f"try:  moe-service generate --address {address} \"hello\"", flush=True)
    if ns.demo:
        _demo_generation(address, ns.api_key)
        if not ns.no_http_api:
            _demo_http(f"{ns.host}:{svc.http_port}", ServiceConfig.from_dict(config).model_name(), ns.api_key)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if not ns.demo:
        stop.wait()
    print("shutting down ...", flush=True)
    if front:
        front.close()
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


def add_parsers(sub) -> None:
    for name, help_text, demo in (
        ("serve", "start Ray (or join --ray-address), deploy gateway + expert workers, serve until Ctrl-C", False),
        ("demo", "the README's first command: serve the embedded default, stream one generation, stop", True),
    ):
        sp = sub.add_parser(name, help=help_text)
        add_model_args(sp)
        sp.add_argument("--workers", type=int, default=2, help="expert worker actors")
        sp.add_argument("--gpus-per-worker", type=float, default=None,
                        help="default: 1 where there is a GPU for every worker and the gateway, an even share of "
                        "this host's GPUs where fewer, 0 where none (with --ray-address: the cluster's)")
        sp.add_argument("--gateway-gpus", type=float, default=None,
                        help="GPUs per gateway replica (attention, KV cache, sampling); default: as --gpus-per-worker")
        sp.add_argument("--replicas-per-worker", type=int, default=None, help="expert replicas per layer per worker")
        sp.add_argument("--redundant-experts", type=int, default=0, help="experts per layer to replicate at start")
        sp.add_argument("--min-replicas", type=int, default=None, help="every expert on at least this many workers, "
                        "always (a lost worker's pairs then have a replica elsewhere at once); default: 2 where the "
                        "workers' memory holds it, else 1")
        sp.add_argument("--standby", choices=["device", "host"], default="device",
                        help="where standbys' weights wait: on the device, or in the node's memory until first used")
        sp.add_argument("--speculative", type=int, default=None, metavar="K",
                        help="speculative decoding: the model's multi-token-prediction layer drafts K (1-8) tokens a "
                        "step, one step verifies them, output unchanged (coder ships one; so do DeepSeek-V3/R1)")
        sp.add_argument("--quantize", choices=["fp8"], default=None,
                        help="keep the routed experts in FP8 128x128 blocks (an FP8 checkpoint's are, always)")
        sp.add_argument("--port", type=int, default=0 if demo else 9000, help="client gRPC port (0: a free one)")
        sp.add_argument("--http-port", type=int, default=0 if demo else 8000,
                        help="the OpenAI HTTP API's port (0: a free one)")
        sp.add_argument("--no-http-api", action="store_true",
                        help="gRPC only: no OpenAI HTTP API")
        sp.add_argument("--front", action="store_true",
                        help="HAProxy on the client gRPC port, refusing past the gateways' limits before any Python "
                        "process sees the call (needs haproxy; docs/deploy.md, 'The gRPC front')")
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--sd-port", type=int, default=0 if demo else 9095,
                        help="controller HTTP: Prometheus http_sd /targets, /stats, /rebalance")
        sp.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
        sp.add_argument("--api-key", default=None, help="require 'authorization: Bearer KEY' from clients")
        sp.add_argument("--gateway-cpus", type=float, default=0.0 if demo else 1.0)
        sp.add_argument("--expert-host", default=None, help="address expert workers bind; default: loopback, "
                        "or the node IP with --ray-address")
        sp.set_defaults(fn=cmd_serve, demo=demo)
    fp = sub.add_parser("front", help="run HAProxy as the gRPC front of a deployed service (cluster/, k8s/), or "
                        "--print its configuration")
    size = fp.add_mutually_exclusive_group(required=True)
    size.add_argument("--limit", type=int, help="calls in flight to the service at most; the rest are refused")
    size.add_argument("--serve-config", help="the Serve config file the service was deployed with: the limit is "
                      "what its gateways admit at once, (max_running + max_queue) x replicas at their most")
    fp.add_argument("--listen", default="0.0.0.0:9000", help="where clients connect")
    fp.add_argument("--target", default="127.0.0.1:9001", help="Serve's gRPC port (grpc_options.port)")
    fp.add_argument("--print", action="store_true", help="print the configuration instead of running HAProxy")
    fp.set_defaults(fn=cmd_front)


def cmd_front(ns: argparse.Namespace) -> int:
    import yaml

    from moe_service.serving.config import ServiceConfig
    from moe_service.serving.front import gateway_capacity, haproxy_binary, render

    limit = ns.limit
    if ns.serve_config:
        with open(ns.serve_config) as f:
            limit = gateway_capacity(ServiceConfig.from_dict(yaml.safe_load(f)["applications"][0].get("args", {})))
    text = render(ns.listen, ns.target, limit)
    if ns.print:
        print(text, end="")
        return 0
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="moe-front-"), "haproxy.cfg")
    with open(path, "w") as f:
        f.write(text)
    os.execv(haproxy_binary(), ["haproxy", "-db", "-f", path])
