"""Shared fixtures. Ray is started once per test module that needs it (see `ray_local`)."""

from __future__ import annotations

import os

import pytest

# Ray on a 2-core machine: no dashboard, no usage reporting, quiet logs
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="module")
def ray_local(request):
    """A local Ray instance declaring logical GPUs (4, or the module's RAY_GPUS), shut down (with Serve) when
    the module ends."""
    import ray

    from moe_service.serving.proxy_limits import RUNTIME_ENV

    settings = dict(num_cpus=2, num_gpus=getattr(request.module, "RAY_GPUS", 4), include_dashboard=False, namespace="moe_service", log_to_driver=False,
                    runtime_env=RUNTIME_ENV)
    # Ray's own start-up now and then times out on a busy 2-core machine ("The current node timed out during
    # startup": the raylet never came up, ray-project/ray#62883), once twice in a row in a clean-clone run;
    # two more tries, then it counts
    for attempt in range(3):
        try:
            ray.init(**settings)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
