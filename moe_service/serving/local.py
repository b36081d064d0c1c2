"""Bring the whole service up on a Ray instance (local or `--ray-address`) and take it down again."""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass
from typing import Any

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from moe_service.serving.config import APP_NAME
from moe_service.serving.gateway.app import SERVICER_FUNCTIONS, build_app
from moe_service.serving.config import CONTROLLER_NAME, NAMESPACE
from moe_service.serving.control.actor import prestart_controller


def free_port(block: int = 1) -> int:
    """A port that is free now (or the first of `block` consecutive free ones), for a server that binds it
    later: Serve's proxies and Ray's nodes take a number, not a socket. Drawn from below the kernel's
    ephemeral range, because a port the kernel hands out (bind to 0) can be taken as the source port of
    any outgoing connection before the server binds it, and with Ray's many connections that happens."""
    try:
        first_ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    for _ in range(100):
        base = random.randrange(10000, max(first_ephemeral - block, 10001))
        try:
            for port in range(base, base + block):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {block} free consecutive port(s) found in 10000..{first_ephemeral - 1}")


@dataclass
class LocalService:
    grpc_port: int
    http_port: int
    config: dict[str, Any]
    owns_serve: bool = True  # Serve was started for this service (start_service), so its shutdown stops it

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def controller(self):
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)

    def worker_pings(self) -> list[dict]:
        """Each expert worker's own report (ExpertWorker.ping): what it hosts, in which dtype, its memory."""
        infos = ray.get(self.controller().worker_info.remote())
        return [ray.get(ray.get_actor(w["actor_name"], namespace=NAMESPACE).ping.remote()) for w in infos]

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        """Until the client-facing port answers SERVING to a standard health check."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the service at {self.address} did not report SERVING in {timeout_s:.0f}s")
                time.sleep(0.2)  # polling a server that is starting

    def shutdown(self) -> None:
        stop_service()
        if self.owns_serve:
            serve.shutdown()


def stop_service() -> None:
    """Takes the service on the connected Ray down (drained, its app deleted, its controller and through it
    the expert workers stopped), leaving Serve running; nothing to stop is no error."""
    try:
        ray.get(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE).drain.remote(), timeout=10)
    except Exception:
        pass
    if serve_grpc_port() is not None:  # Serve runs (a test may have stopped it)
        serve.delete(APP_NAME)
    try:
        ctl = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        ray.get(ctl.shutdown.remote(), timeout=30)
        ray.kill(ctl, no_restart=True)  # it is restartable: this one is meant
    except ValueError:
        pass


class ClusterAuthError(RuntimeError):
    """The Ray cluster refused this process's credentials."""


def check_cluster_auth(address: str, timeout_s: float = 5.0) -> None:
    """Asks the cluster's GCS one question with the credentials ray.init would send, and fails at once,
    naming what to set, if the cluster refuses them (ray.init itself retries for a while and then
    reports only that it could not connect). An address that does not answer is left to ray.init."""
    import os
    from pathlib import Path

    from ray._private.services import canonicalize_bootstrap_address

    target = canonicalize_bootstrap_address(address) or address
    mode = os.environ.get("RAY_AUTH_MODE", "")
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if mode == "token" and not token and Path(path).is_file():
        token = Path(path).read_text().strip()
    metadata = [("authorization", f"Bearer {token}")] if mode == "token" and token else []
    with grpc.insecure_channel(target) as ch:
        try:
            ch.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                return
            have = (f"RAY_AUTH_MODE is {mode!r}" if mode != "token" else
                    "RAY_AUTH_MODE is 'token', but the token sent is not the cluster's" if token else
                    f"RAY_AUTH_MODE is 'token', but no token was found (RAY_AUTH_TOKEN, or the file {path})")
            raise ClusterAuthError(
                f"the Ray cluster at {target} uses token authentication and refused this client: {have}. Set "
                "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (for "
                "cluster/local-multinode.sh: eval \"$(cluster/local-multinode.sh env)\")") from None


def serve_grpc_port() -> int | None:
    """The gRPC port of the Serve instance running on the connected Ray, or None when none runs."""
    from ray.serve.context import _get_global_client  # Serve's own lookup of its running controller

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.get_serve_details().get("grpc_options", {}).get("port")


def start_serve(grpc_port: int = 0, request_timeout_s: float | None = None, proxy_location: str = "HeadOnly") -> int:
    """Starts Serve's controller and proxies, the gRPC proxy on `grpc_port` (0 picks a free one) with the
    gateway's servicers; returns that port. Services started after it on the same Ray reuse it (a test module
    starts it once: each service then saves Serve's start and stop, two actor processes)."""
    grpc_port = grpc_port or free_port()
    serve.start(
        proxy_location=proxy_location,
        # a line per request in the proxy's and the replica's logs costs their event loops more than the
        # request itself under a burst; metrics count every request (moe_requests_total)
        logging_config={"enable_access_log": False},
        http_options=HTTPOptions(host="127.0.0.1", port=free_port()),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS,
                                 request_timeout_s=request_timeout_s),
    )
    return grpc_port


def start_service(config: dict[str, Any], grpc_port: int = 0, http_port: int = 0, host: str = "127.0.0.1",
                  wait: bool = True) -> LocalService:
    """Deploys the app on the connected Ray instance (call ray.init first); port 0 picks a free one. gRPC is
    Serve's gRPC proxy's on `grpc_port`: Serve is started here unless it runs already (`start_serve`), then
    its port is the service's. The OpenAI HTTP API is the HTTP front's on `http_port` (Serve's own HTTP proxy,
    which Serve always starts, gets a free port on loopback and serves nothing)."""
    http_port = http_port or free_port()
    config = {**config, "http_host": host, "http_port": http_port}
    app = build_app(config)  # checks the settings before anything starts
    # the controller places the experts and starts the workers while Serve starts its own actors and boots
    # the gateway replica (each a process importing torch): they overlap instead of following each other
    prestart_controller(config)
    running = serve_grpc_port()
    if running is None:
        grpc_port = start_serve(grpc_port)
    elif grpc_port in (0, running):
        grpc_port = running
    else:
        raise RuntimeError(f"Serve already runs on this Ray cluster with its gRPC proxy on port {running}, "
                           f"not {grpc_port}: use that port, or stop Serve first (serve shutdown)")
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:  # Serve says only that the deployment failed; its status holds the replica's error
        app_status = serve.status().applications.get(APP_NAME)
        why = "\n".join(d.message for d in app_status.deployments.values() if d.message) if app_status else ""
        raise RuntimeError(f"{e}\n{why}" if why else str(e)) from None
    svc = LocalService(grpc_port, http_port, config, owns_serve=running is None)
    if wait:
        svc.wait_serving()
    return svc
