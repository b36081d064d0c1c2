"""The controller as a named, detached, restartable Ray actor, and how a gateway finds (or creates) it."""

from __future__ import annotations

import ray

from moe_service.serving.config import CONTROLLER_NAME, NAMESPACE, ServiceConfig
from moe_service.serving.control.controller import Controller, settings_digest

ControllerActor = ray.remote(num_cpus=0, max_concurrency=64)(Controller)


def _named_controller(config: dict):
    # pinned to the head node (as Serve pins its own controller): it must outlive any worker node
    return ControllerActor.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1,
        max_task_retries=-1, resources={"node:__internal_head__": 0.001}).remote(config)


def prestart_controller(config: dict) -> None:
    """Creates the controller and asks it to start (place the experts, start the workers) without waiting:
    `start_service` calls it first, so that the workers come up while Serve starts and boots the gateway
    replicas, whose `get_or_create_controller` then waits only for what is left. A failed start fails
    there too (`Controller.start` runs once at a time and again after a failure)."""
    _named_controller(config).start.remote()


def get_or_create_controller(config: dict, start_timeout_s: float | None = None):
    """The named detached controller for this config (created if absent) after `start()` succeeded. Ray
    restarts it if its process dies (`max_restarts`); calls made meanwhile are retried."""
    cfg = ServiceConfig.from_dict(config)
    handle = _named_controller(config)
    running = ServiceConfig.from_dict(ray.get(handle.settings.remote()))
    if ray.get(handle.config_digest.remote()) != settings_digest(cfg):
        changed = sorted(k for k, v in cfg.redacted().items() if running.redacted().get(k) != v)
        raise RuntimeError(
            f"a controller with other settings ({changed or ['its keys']}) is already running in namespace "
            f"{NAMESPACE!r}; to change them, drain and shut it down first (docs/deploy.md, 'Rolling out a new model')")
    ray.get(handle.start.remote(), timeout=start_timeout_s)
    return handle
