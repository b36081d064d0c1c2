"""The Serve application: the gateway deployment, and the builder `serve run`/`serve deploy` import.

Serve config: `import_path: moe_service.serving.gateway.app:build_app` with the ServiceConfig fields as `args`.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from moe_service.serving.config import APP_NAME, GATEWAY_NAME, HTTP_FRONT_NAME, ServiceConfig  # noqa: F401 (APP_NAME)
from moe_service.serving.gateway.deployment import GatewayDeployment
from moe_service.serving.gateway.http_front import HTTPFront
from moe_service.serving.gateway.router import ROUTING_STATS_PERIOD_S, CacheAffinityRouter

SERVICER_FUNCTIONS = [
    "moe_service.serving.gateway.grpc_api.add_InferenceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `args` are ServiceConfig fields."""
    cfg = ServiceConfig.from_dict(args)
    sched = cfg.scheduler_config()
    # the gateway waits on the workers for much of a step: an OpenMP thread spinning meanwhile (libgomp's
    # default) takes a core from CPU workers on the same node (docs/performance.md)
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    options: dict[str, Any] = {
        "name": GATEWAY_NAME,
        "ray_actor_options": {"num_cpus": cfg.gateway_num_cpus, "num_gpus": cfg.gateway_gpus,
                              "resources": dict(cfg.gateway_resources), "runtime_env": {"env_vars": env}},
        # Admission is the gateway's: it runs max_running, queues max_queue and refuses the rest at once
        # with RESOURCE_EXHAUSTED and a retry hint. Serve sends a replica up to twice that, so requests
        # being refused never wait in the proxy; past that (every replica full) the proxy queues at most
        # max_queue more and refuses the rest, also as RESOURCE_EXHAUSTED.
        "max_ongoing_requests": 2 * (sched.max_running + sched.max_queue),
        "max_queued_requests": sched.max_queue,
        # a replica being stopped checks this often whether its requests are done (Serve's default is 2 s,
        # the least any stop then takes; the controller drains before a planned one)
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    if cfg.cache_aware_routing:
        # every call to the gateway, from Serve's gRPC proxy or the HTTP front's handle, goes first to the
        # replica holding the longest cached prefix of its prompt (router.py)
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=CacheAffinityRouter, request_router_kwargs={"model": cfg.model},
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S)
    if cfg.gateway_autoscaling:
        options["autoscaling_config"] = cfg.gateway_autoscaling
    else:
        options["num_replicas"] = cfg.gateway_replicas
    # The gateway is the application's one ingress, for gRPC, with no ASGI wrapper (it slowed every request,
    # gRPC ones too). HTTP comes from the HTTP front beside it: a second application would make Serve's gRPC
    # proxy demand `application` metadata on every call. The front is bound here only so that it deploys with
    # the application; it reaches the gateway through a handle.
    front = None
    if cfg.http_api:
        # on the head node, where the HTTP port is published (as Serve's own proxy runs there)
        front = serve.deployment(name=HTTP_FRONT_NAME, num_replicas=1, graceful_shutdown_wait_loop_s=0.5,
                                 ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
                                 )(HTTPFront).bind(cfg.to_dict())
    return serve.deployment(**options)(GatewayDeployment).bind(cfg.to_dict(), front)
