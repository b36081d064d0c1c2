"""The Serve application: the gateway deployment, and the builder `serve run`/`serve deploy` import.

Serve config: `import_path: moe_service.serving.gateway.app:build_app` with the ServiceConfig fields as `args`.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from moe_service.serving.config import ServiceConfig
from moe_service.serving.gateway.deployment import GatewayDeployment

GATEWAY_NAME = "MoEGateway"
APP_NAME = "moe"
SERVICER_FUNCTIONS = [
    "moe_service.transport.pb.moe_pb2_grpc.add_InferenceServicer_to_server",
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
    if cfg.gateway_autoscaling:
        options["autoscaling_config"] = cfg.gateway_autoscaling
    else:
        options["num_replicas"] = cfg.gateway_replicas
    # Serve's ASGI ingress wrapper costs every request of the replica, gRPC ones too: on this 2-core machine
    # about 20% of the ingress's throughput under overload (docs/performance.md); gRPC-only services can
    # leave it out
    cls = serve.ingress()(GatewayDeployment) if cfg.http_api else GatewayDeployment
    return serve.deployment(**options)(cls).bind(cfg.to_dict())
