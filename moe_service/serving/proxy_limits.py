"""A setup hook for the processes of a Ray job that starts Serve: raises gRPC's limit on requests
waiting to be matched to a handler in Serve's gRPC proxy.

gRPC's core cancels new calls (CANCELLED, with no reason given) once more than 1000 wait to be picked
up by a server whose event loop is busy; a burst of a thousand-odd concurrent Generate calls on one
proxy meets that limit (docs/performance.md, overload). Ray Serve 2.60 has no setting for its proxy's
server options, so this adds one to the list its proxy builds its server with. It is applied as
`ray.init(runtime_env={"worker_process_setup_hook": "moe_service.serving.proxy_limits.install"})`, which
`moe-service serve` does.
"""

from __future__ import annotations

MAX_PENDING_REQUESTS = 100_000  # gRPC's default is 1000 (hard limit 3000)


def install() -> None:
    try:
        from ray.serve._private import constants
    except ImportError:  # pragma: no cover - not a Serve installation
        return
    options = constants.DEFAULT_GRPC_SERVER_OPTIONS
    for name in ("grpc.server.max_pending_requests", "grpc.server.max_pending_requests_hard_limit"):
        if name not in dict(options):
            options.append((name, MAX_PENDING_REQUESTS))


RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.install"}
