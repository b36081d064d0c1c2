"""Shared fixtures. One local Ray and one Serve serve the whole session (see `ray_local`)."""

from __future__ import annotations

import os

import pytest

# Ray on a 2-core machine: no dashboard, no usage reporting, quiet logs
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down the session's Ray (and Serve), if one was started, when the session ends."""
    yield
    import ray

    if ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _start_ray(ray) -> None:
    from moe_service.serving.proxy_limits import RUNTIME_ENV

    # a logical GPU per expert worker of the largest service here (test_simulated's 8)
    settings = dict(num_cpus=2, num_gpus=8, include_dashboard=False, namespace="moe_service", log_to_driver=False,
                    runtime_env=RUNTIME_ENV)
    # Ray's own start-up now and then times out on a busy 2-core machine ("The current node timed out during
    # startup": the raylet never came up, ray-project/ray#62883), once twice in a row in a clean-clone run;
    # two more tries, then it counts
    for attempt in range(3):
        try:
            ray.init(**settings)
            return
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise


def _leave_no_service(ray) -> None:
    """What a module's services left behind, should a test have failed before its own shutdown: the app, the
    controller and any worker it no longer knew of. The next module starts from an empty Ray and Serve."""
    from moe_service.serving.config import NAMESPACE
    from moe_service.serving.local import stop_service

    stop_service()
    for name in ray.util.list_named_actors(all_namespaces=True):
        if name["namespace"] == NAMESPACE:
            ray.kill(ray.get_actor(name["name"], namespace=NAMESPACE), no_restart=True)


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """A local Ray instance (2 CPUs, 8 logical GPUs) with Serve running, its gRPC proxy carrying the gateway's
    servicers: started by the first module that asks and kept for the session (the two take ~12 s to start
    on 2 cores, and `start_service` reuses a running Serve); each module ends with no service left on them."""
    import ray

    from moe_service.serving.local import serve_grpc_port, start_serve

    if not ray.is_initialized():
        _start_ray(ray)
    if serve_grpc_port() is None:  # a module before stopped it
        start_serve()
    yield ray
    _leave_no_service(ray)
