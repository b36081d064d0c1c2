"""The front that refuses before Python: HAProxy speaking HTTP/2 cleartext in front of Serve's gRPC port.

Serve's gRPC proxy admits about 300 calls a second on a 2-core machine, so at 4x overload a refused client
waits seconds in its queue before the gateway says no (docs/performance.md, "Ingress"). HAProxy holds at
most `limit` calls in flight to the service and answers the rest itself, within a millisecond of queueing,
with a trailers-only RESOURCE_EXHAUSTED carrying `grpc-retry-pushback-ms` as a real trailer. Everything else
passes through untouched: metadata (auth, no `application` needed), cancellation (RST_STREAM), health,
draining, and malformed bytes, which reach the gateway and get INVALID_ARGUMENT.

`limit` is what the gateways admit at once: (max_running + max_queue) times the replicas at their most, so
the front never refuses a call the gateways could take. `moe-service front` runs it; k8s/ and cluster/ put
it on the head node's client-facing gRPC port (docs/deploy.md, "The gRPC front")."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CONFIG = """\
# rendered by moe_service.serving.front (`moe-service front --print`); do not edit by hand
global
    maxconn 5000  # connections (HAProxy asks for about twice as many file descriptors); calls are streams
    # HTTP/2's default of 100 streams a connection would hold a client's calls back in the client, where no
    # limit sees them: the front must see every call in flight
    tune.h2.max-concurrent-streams 10000
defaults
    mode http
    timeout connect 5s
    timeout client {timeout_s}s
    timeout server {timeout_s}s
    # a call past the limit waits in HAProxy's queue for at most a millisecond, then is refused
    timeout queue 1ms
frontend grpc
    bind {listen} proto h2
    default_backend service
    # HAProxy refuses a call it could not queue with HTTP 503. A gRPC client reads grpc-status, so that reply
    # becomes a trailers-only RESOURCE_EXHAUSTED with the retry hint as its trailer
    http-error status 503 hdr grpc-status 8 hdr grpc-message "{message}" hdr grpc-retry-pushback-ms {retry_ms}
    http-after-response set-header content-type application/grpc if {{ status 503 }}
    http-after-response set-status 200 if {{ status 503 }}
backend service
    server serve {target} proto h2 maxconn {limit}
"""


def render(listen: str, target: str, limit: int, retry_ms: int = 1000, timeout_s: int = 600) -> str:
    """HAProxy's configuration: clients connect to `listen`, calls go to Serve's gRPC port at `target`."""
    if limit < 1:
        raise ValueError(f"the front's limit must be at least 1 call in flight, not {limit}")
    message = f"the service's limit of {limit} calls in flight is reached (retry in about {retry_ms} ms)"
    # grpc-message is percent-encoded; HAProxy reads % as the start of a log-format variable, so %% it is
    return CONFIG.format(listen=listen, target=target, limit=limit, retry_ms=retry_ms, timeout_s=timeout_s,
                         message=message.replace(" ", "%%20"))


def gateway_capacity(config) -> int:
    """Calls the gateways admit at once, with Serve's autoscaling at its most: the front's limit."""
    replicas = (config.gateway_autoscaling or {}).get("max_replicas", config.gateway_replicas)
    sched = config.scheduler_config()
    return replicas * (sched.max_running + sched.max_queue)


def haproxy_binary() -> str:
    binary = shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("haproxy is not installed (Debian: apt-get install haproxy; scripts/setup.sh does)")
    return binary


class HAProxyFront:
    """HAProxy running `render(...)` as a child process: `with HAProxyFront(target, limit) as front:` and
    clients use `front.address`."""

    def __init__(self, target: str, limit: int, listen: str | None = None, retry_ms: int = 1000):
        from moe_service.serving.local import free_port

        self.address, self.limit = listen or f"127.0.0.1:{free_port()}", limit
        self._dir = Path(tempfile.mkdtemp(prefix="moe-front-"))
        cfg = self._dir / "haproxy.cfg"
        cfg.write_text(render(self.address, target, limit, retry_ms))
        self._proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        try:
            self._wait_listening()
        except BaseException:
            self.close()
            raise

    def _wait_listening(self, timeout_s: float = 10.0) -> None:
        host, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self._proc.stderr.read().decode()[-2000:]}")
            try:
                socket.create_connection((host if host != "0.0.0.0" else "127.0.0.1", int(port)), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)  # polling a child process's listen socket, not synchronising a test
        raise TimeoutError(f"haproxy did not listen on {self.address} in {timeout_s} s")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "HAProxyFront":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
