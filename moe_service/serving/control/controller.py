"""The controller: wires the control plane's parts into one named, detached, restartable Ray actor.

The parts, each with one job (`serving/control/`): the worker pool behind an injected launcher, the
load window, the rebalance protocol, the HTTP surface. Here: the table gateways route with (versioned,
long-polled), autoscaling, stats, and recovery after the controller's own loss. Gateways read the table
from it and report their routed-token counts to it; the data plane never waits on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time

import numpy as np
import ray
from prometheus_client import generate_latest

from moe_service.checkpoint import open_source
from moe_service.serving.metrics import ControllerMetrics
from moe_service.placement import AutoscaleSettings, AutoscaleState, Placement, decide, plan
from moe_service.placement.timeaware import busiest_seconds
from moe_service.serving.config import CONTROLLER_NAME, NAMESPACE, ServiceConfig
from moe_service.serving.control.http import Routes, serve_http
from moe_service.serving.control.pool import Launcher, Pairs, Worker, WorkerPool
from moe_service.serving.control.rebalance import Gateways, ProtocolSettings, apply_placement
from moe_service.serving.control.window import LoadWindow

log = logging.getLogger("moe_service.controller")


def initial_placement(cfg: ServiceConfig, num_layers: int, num_experts: int, slots: int) -> Placement:
    if cfg.redundant_experts <= 0:
        return Placement.round_robin(num_layers, num_experts, cfg.workers, slots)
    # the first `redundant_experts` experts of each layer look hot: the planner gives them more replicas
    load = np.ones((num_layers, num_experts))
    load[:, : cfg.redundant_experts] = 2.0 * cfg.workers
    return plan(load, cfg.workers, slots)


class Controller:
    def __init__(self, config: dict, launcher: Launcher | None = None, recovering: bool | None = None) -> None:
        cfg = self.cfg = ServiceConfig.from_dict(config)
        self.args = open_source(cfg.model).args
        self.moe_layers = self.args.moe_layers
        self.replicas_per_worker = cfg.replicas_per_worker or math.ceil(1.25 * self.args.n_routed_experts / cfg.workers)
        self.worker_seconds = cfg.worker_seconds(self.args) if cfg.rebalance_objective == "time" else None
        if launcher is None or recovering is None:
            from moe_service.serving.control.ray_launcher import RayLauncher

            service = ray.get_runtime_context().get_actor_name() or CONTROLLER_NAME
            launcher = launcher or RayLauncher(cfg, self.replicas_per_worker, cfg.tls(), service)
            # a Ray actor restarted after its loss: the workers are still running, find them
            recovering = ray.get_runtime_context().was_current_actor_reconstructed if recovering is None else recovering
        self.launcher, self.recovering = launcher, recovering
        self.pool = WorkerPool(launcher, self._republish)
        self.window = LoadWindow(cfg.load_window_s)
        self.gateways = Gateways()
        self.protocol = ProtocolSettings(cfg.confirm_timeout_s, cfg.gateway_recent_s)
        self.placement: Placement | None = None
        self.version = 0
        self.cond = asyncio.Condition()
        self.ready = self.draining = False
        self.targets: dict[str, dict] = {}  # metrics targets: key -> {"address", "labels"}
        self.metrics = ControllerMetrics(expert_series=cfg.expert_metrics)
        self.autoscale = AutoscaleSettings(**cfg.autoscaling) if cfg.autoscaling else None
        self.autoscale_state: AutoscaleState | None = None
        self.rebalance_lock = asyncio.Lock()
        self.last_rebalance: dict = {}
        self.tasks: list[asyncio.Task] = []
        self.http: asyncio.AbstractServer | None = None
        self._up_lock = asyncio.Lock()

    # ---- lifecycle ---------------------------------------------------------------------------

    def pairs_of(self, placement: Placement, worker_id: int) -> Pairs:
        return [(self.moe_layers[l], e) for l, e in placement.hosted(worker_id)]

    async def start(self) -> dict:
        """Place the experts, start every worker, publish the first ready table. Fails loudly."""
        await self._up()
        if self.ready:
            return self._table()
        placement = initial_placement(self.cfg, len(self.moe_layers), self.args.n_routed_experts, self.replicas_per_worker)
        results = await asyncio.gather(*(self.pool.start(w, self.pairs_of(placement, w))
                                         for w in range(placement.num_workers)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.pool.stop_all()
            raise errors[0]
        self._began(placement)
        await self.publish(placement, ready=True)
        return self._table()

    def _began(self, placement: Placement) -> None:
        self.placement = placement
        for w in self.pool.workers.values():
            self._target(w)
        if self.autoscale is not None:
            self.autoscale_state = AutoscaleState.initial(self.autoscale, len(self.pool.workers))
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._watch_workers()))
        if self.cfg.rebalance_interval_s > 0:
            self.tasks.append(loop.create_task(self._rebalance_loop()))
        if self.autoscale is not None:
            self.tasks.append(loop.create_task(self._autoscale_loop()))

    async def _up(self) -> None:
        """Once, on the actor's loop: the HTTP surface, and after a restart the running workers."""
        async with self._up_lock:
            if self.http is not None:
                return
            host = self.cfg.expert_bind_host or _node_ip()
            self.http = await serve_http(Routes(self._targets, lambda: generate_latest(self.metrics.registry),
                                                self.stats, lambda dry: self.rebalance(dry_run=dry, force=not dry),
                                                self.cfg.resolved_admin_key), host, self.cfg.sd_port)
            self.targets["controller"] = {"address": self._http_address(), "labels": {"component": "controller"}}
            if self.recovering:
                await self._recover()

    async def _recover(self) -> None:
        """After this controller's loss: adopt the workers still running (nothing reloads), rebuild the
        placement from what they host, replace any worker lost meanwhile, and publish a table whose version
        is above any a gateway holds (they ignore lower ones: see `_saw_version`)."""
        found = await self.launcher.running()
        for f in found:
            self.pool.adopt(f)
        L, E = len(self.moe_layers), self.args.n_routed_experts
        layer_index = {layer: i for i, layer in enumerate(self.moe_layers)}
        num_workers = max([self.cfg.workers - 1, *(f.worker_id for f in found)]) + 1
        hosts = np.zeros((L, E, num_workers), dtype=bool)
        for f in found:
            for layer, e in f.pairs:
                hosts[layer_index[layer], e, f.worker_id] = True
        lost = [w for w in range(num_workers) if w not in self.pool.workers]
        for i, (l, e) in enumerate(np.argwhere(~hosts.any(axis=2))):  # experts whose every host was lost
            hosts[l, e, lost[i % len(lost)] if lost else i % num_workers] = True
        placement = Placement(hosts, hosts / hosts.sum(axis=2, keepdims=True), self.replicas_per_worker)
        for w in lost:  # a generation no earlier process of it can have had
            await self.pool.start(w, self.pairs_of(placement, w), max([0, *(f.generation for f in found)]) + 1)
        log.warning("controller restarted: adopted %d running workers, restarted %d", len(found), len(lost))
        self.recovering = False
        self._began(placement)
        # versions count publications, a few a second at most: milliseconds of the clock are above any
        # version the lost controller gave out (and `_saw_version` covers a clock that went back)
        self.version = max(self.version, int(time.time() * 1000))
        await self.publish(placement, ready=True)

    async def publish(self, placement: Placement | None = None, ready: bool | None = None) -> int:
        """A new table version (gateways long-poll for it); returns the version."""
        async with self.cond:
            if placement is not None:
                self.placement = placement
                self._export_placement()
            if ready is not None:
                self.ready = ready
            self.version += 1
            self.metrics.version.set(self.version)
            self.metrics.workers.set(sum(w.healthy for w in self.pool.workers.values()))
            for w in self.pool.workers.values():
                self.metrics.worker_up.labels(str(w.worker_id)).set(int(w.healthy))
                self._target(w)
            self.cond.notify_all()
            return self.version

    async def _republish(self) -> None:
        if self.placement is not None:
            await self.publish()

    async def _saw_version(self, version: int) -> None:
        """A gateway holds a version above this controller's (a clock that went back across a restart):
        a gateway only takes a table newer than its own, so the next one gets a higher number."""
        if version > self.version and self.placement is not None:
            async with self.cond:
                self.version = version
            await self.publish()

    def _target(self, w: Worker) -> None:
        if w.metrics:
            self.targets[f"worker-{w.worker_id}"] = {
                "address": w.metrics, "labels": {"component": "expert_worker", "worker": str(w.worker_id)}}

    async def _watch_workers(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)  # a polling period, not a synchronisation
            await self.pool.check_all()

    async def report_unavailable(self, worker_id: int) -> None:
        """A gateway could not reach a worker: check it now instead of at the next tick."""
        await self._up()
        worker = self.pool.workers.get(worker_id)
        if worker is not None:
            await self.pool.check(worker)

    async def drain(self) -> None:
        """Gateways report NOT_SERVING from now on (before a shutdown or a rollout)."""
        self.draining = True
        await self.publish()

    async def shutdown(self) -> None:
        self.draining = True
        for t in self.tasks:
            t.cancel()
        if self.tasks:  # a worker being started or stopped meanwhile is killed as its task unwinds
            await asyncio.wait(self.tasks, timeout=10)
        await self.pool.stop_all()
        await self.launcher.stop_all()  # any the pool did not know of, or did not finish starting
        for key in [k for k in self.targets if k.startswith("worker-")]:
            del self.targets[key]
        await self.publish(ready=False)
        if self.http is not None:
            self.http.close()

    # ---- load, rebalancing, autoscaling ------------------------------------------------------------

    async def report_load(self, gateway: str, counts: list[list[int]], table_version: int,
                          metrics_address: str | None) -> None:
        """A gateway's routed-token counts `[L, E]` since its last report, and the table it routes with."""
        await self._up()
        self.window = self.window.add(time.monotonic(), np.asarray(counts, dtype=np.float64))
        if metrics_address:
            self.targets[f"gateway-{gateway}"] = {"address": metrics_address,
                                                  "labels": {"component": "gateway", "replica": gateway}}
        await self.gateways.report(gateway, table_version)
        await self._saw_version(table_version)

    def window_load(self) -> np.ndarray:
        """Routed tokens per (MoE layer, expert) over the window: `[L, E]`."""
        return self.window.total(time.monotonic(), (len(self.moe_layers), self.args.n_routed_experts))

    def _export_placement(self, load: np.ndarray | None = None) -> None:
        p = self.placement
        counts = p.replica_counts()
        for l, layer in enumerate(self.moe_layers):
            if self.metrics.expert_series == "expert":
                for e in range(p.num_experts):
                    self.metrics.replicas.labels(str(layer), str(e)).set(counts[l, e])
            elif self.metrics.expert_series == "layer":
                self.metrics.replicas.labels(str(layer)).set(counts[l].sum())
        if load is not None and load.sum() > 0:
            for l, b in enumerate(p.balancedness(load)):
                self.metrics.balancedness.labels(str(self.moe_layers[l])).set(float(b))

    def plan_rebalance(self, num_workers: int | None = None) -> dict:
        """The placement the current load window asks for, and its expected quality (`gain`: by the
        objective); applies nothing."""
        load = self.window_load()
        W = num_workers or len(self.pool.workers)
        busy = load.sum() > 0
        by_time = {}
        if self.worker_seconds is not None:
            by_time = dict(objective="time", worker_seconds=self.worker_seconds,
                           pairs_per_step=self.cfg.tokens_per_call() * self.args.num_experts_per_tok)
        new = plan(load if busy else np.ones_like(load), W, self.replicas_per_worker, current=self.placement, **by_time)
        # an empty window says nothing: no gain (a forced rebalance or a new worker count still applies)
        before = self.placement.balancedness(load) if busy else np.ones(len(self.moe_layers))
        after = new.balancedness(load) if busy else np.ones(len(self.moe_layers))
        out = {"objective": self.cfg.rebalance_objective, "balancedness_before": before.tolist(),
               "balancedness_after": after.tolist(), "gain": float(np.mean(after) - np.mean(before))}
        if by_time and busy:
            t0, t1 = (float(busiest_seconds(load, p, self.worker_seconds, by_time["pairs_per_step"]).mean())
                      for p in (self.placement, new))
            out.update(predicted_expert_stage_s_before=t0, predicted_expert_stage_s_after=t1, gain=t0 / t1 - 1)
        return {"placement": new.to_dict(), **out,
                "moves": new.moves_from(self.placement) if new.num_workers == self.placement.num_workers else None,
                "workers": W, "load_tokens": float(load.sum())}

    async def rebalance(self, dry_run: bool = False, force: bool = False, num_workers: int | None = None) -> dict:
        """Re-plan from the load window and apply it without stopping service (`control/rebalance.py`)."""
        await self._up()
        async with self.rebalance_lock:
            proposal = self.plan_rebalance(num_workers)
            gain = proposal["gain"]
            changes = num_workers is not None and num_workers != len(self.pool.workers)
            if dry_run or (not force and not changes and gain < self.cfg.rebalance_min_gain):
                proposal["applied"] = False
                return proposal
            t0 = time.perf_counter()
            new = Placement.from_dict(proposal["placement"])
            proposal["gateways_switched"] = await apply_placement(new, self.pairs_of, self.pool, self._publish_new,
                                                                  self.gateways, self.protocol)
            for key in [k for k in self.targets if k.startswith("worker-") and int(k[7:]) not in self.pool.workers]:
                del self.targets[key]
                self.metrics.worker_up.remove(key[7:])
            self.metrics.rebalances.inc()
            self.metrics.rebalance_seconds.observe(time.perf_counter() - t0)
            self._export_placement(self.window_load())
            proposal.update(applied=True, seconds=time.perf_counter() - t0, version=self.version)
            self.last_rebalance = {k: v for k, v in proposal.items() if k != "placement"}
            return proposal

    async def _publish_new(self, placement: Placement) -> int:
        return await self.publish(placement)

    async def _rebalance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.rebalance_interval_s)  # the re-plan period
            try:
                await self.rebalance()
            except Exception:
                log.exception("periodic rebalance failed; keeping the current placement")

    async def _autoscale_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(max(self.cfg.load_report_interval_s, 0.5))  # the decision period
            await self.autoscale_tick(time.monotonic() - last)
            last = time.monotonic()

    async def autoscale_tick(self, interval_s: float) -> dict:
        """Observe the routed tokens/s of the last interval, decide, and add or remove a worker."""
        now = time.monotonic()
        observed = self.window.pairs_per_second(now, interval_s) / max(1, self.args.num_experts_per_tok)
        desired, self.autoscale_state = decide(self.autoscale, self.autoscale_state, now, observed)
        self.metrics.workers_target.set(desired)
        if desired != len(self.pool.workers):
            log.info("autoscaling expert workers %d -> %d (load %.1f tokens/s)", len(self.pool.workers), desired,
                     observed)
            await self.rebalance(num_workers=desired, force=True)
        return {"observed_tokens_per_s": observed, "desired": desired, "workers": len(self.pool.workers)}

    # ---- what gateways and operators read -------------------------------------------------------

    async def table(self) -> dict:
        """The table gateways route with (see `wait_for_table`)."""
        await self._up()
        return self._table()

    def _table(self) -> dict:
        p = self.placement
        routes = {}
        if p is not None:
            for i, layer in enumerate(self.moe_layers):
                reps = [p.replicas(i, e) for e in range(self.args.n_routed_experts)]
                shares = [[s for _, s in p.share(i, e)] for e in range(self.args.n_routed_experts)]
                routes[layer] = {"replicas": reps, "shares": shares}
        healthy = self.pool.healthy_addresses()
        covered = p is not None and all(
            any(w in healthy for w in p.replicas(i, e))
            for i in range(len(self.moe_layers)) for e in range(self.args.n_routed_experts))
        return {"version": self.version, "routes": routes, "addresses": healthy, "ready": self.ready and covered,
                "draining": self.draining}

    async def wait_for_table(self, newer_than: int, timeout_s: float = 10.0) -> dict:
        """Long poll: returns as soon as the version is above `newer_than`, or after the timeout."""
        await self._up()
        await self._saw_version(newer_than)
        # asyncio.timeout, not wait_for: the condition's lock is taken and released in this one task
        # (wait_for runs the wait in a task of its own, and Python 3.11 can then lose the lock)
        async with self.cond:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.cond.wait_for(lambda: self.version > newer_than)
            except TimeoutError:
                pass
        return self._table()

    async def worker_info(self) -> list[dict]:
        """Each worker's state, as operators and tests read it."""
        await self._up()
        return self._worker_info()

    def _worker_info(self) -> list[dict]:
        name = getattr(self.launcher, "name", lambda w, g: None)
        return [{"worker_id": w, "address": s.address, "healthy": s.healthy, "restarts": s.restarts,
                 "generation": s.generation, "experts": len(s.pairs), "metrics": s.metrics,
                 "actor_name": name(w, s.generation)} for w, s in sorted(self.pool.workers.items())]

    def _targets(self) -> list[dict]:
        return [{"targets": [t["address"]], "labels": t["labels"]} for t in self.targets.values()]

    def stats(self) -> dict:
        """Per-worker expected load and the hottest experts over the load window (`moe-service stats`)."""
        load = self.window_load()
        out: dict = {"version": self.version, "window_s": self.cfg.load_window_s, "workers": self._worker_info(),
                     "load_tokens": float(load.sum()), "last_rebalance": self.last_rebalance}
        p = self.placement
        if p is not None:
            out["worker_load"] = p.worker_load(load).sum(axis=0).tolist()  # [L, W] summed over layers
            out["balancedness"] = dict(zip(map(str, self.moe_layers), p.balancedness(load).tolist()))
            order = np.argsort(load, axis=None)[::-1][:10]
            E = load.shape[1]
            out["hottest"] = [{"layer": self.moe_layers[int(i) // E], "expert": int(i) % E, "tokens": float(load.flat[i]),
                               "replicas": len(p.replicas(int(i) // E, int(i) % E))} for i in order if load.flat[i] > 0]
            out["placement"] = {str(w): [list(x) for x in self.pairs_of(p, w)] for w in self.pool.workers}
        return out

    async def http_address(self) -> str:
        """The HTTP surface's host:port."""
        await self._up()
        return self._http_address()

    def _http_address(self) -> str:
        host, port = self.http.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    def config_digest(self) -> str:
        """Which settings this controller runs with, without showing them (they may hold keys)."""
        return _digest(self.cfg)

    def settings(self) -> dict:
        return self.cfg.redacted()


def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def get_or_create_controller(config: dict, start_timeout_s: float | None = None):
    """The named detached controller for this config (created if absent) after `start()` succeeded. Ray
    restarts it if its process dies (`max_restarts`); calls made meanwhile are retried."""
    cfg = ServiceConfig.from_dict(config)
    # pinned to the head node (as Serve pins its own controller): it must outlive any worker node
    handle = ControllerActor.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1,
        max_task_retries=-1, resources={"node:__internal_head__": 0.001}).remote(config)
    running = ServiceConfig.from_dict(ray.get(handle.settings.remote()))
    if ray.get(handle.config_digest.remote()) != _digest(cfg):
        changed = sorted(k for k, v in cfg.redacted().items() if running.redacted().get(k) != v)
        raise RuntimeError(
            f"a controller with other settings ({changed or ['its keys']}) is already running in namespace "
            f"{NAMESPACE!r}; to change them, drain and shut it down first (docs/deploy.md, 'Rolling out a new model')")
    ray.get(handle.start.remote(), timeout=start_timeout_s)
    return handle


def _digest(cfg: ServiceConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


ControllerActor = ray.remote(num_cpus=0, max_concurrency=64)(Controller)
