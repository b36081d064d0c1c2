"""The controller: a named, detached actor owning the placement table (versioned), the expert workers'
lifecycle (start, health, restart, stop, add, remove), the routed-load window, rebalancing, and
metrics discovery. Gateways read the table from it and report their routed-token counts to it."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import urllib.parse
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import ray
from prometheus_client import generate_latest
from ray.exceptions import GetTimeoutError, RayActorError

from moe_service.checkpoint import open_source
from moe_service.metrics import ControllerMetrics
from moe_service.placement import AutoscaleSettings, AutoscaleState, Placement, decide, plan
from moe_service.serving.config import CONTROLLER_NAME, NAMESPACE, ServiceConfig
from moe_service.serving.worker import ExpertWorkerActor
from moe_service.transport.options import TLSConfig

log = logging.getLogger("moe_service.controller")


@dataclass
class WorkerSlot:
    """One logical worker id; the actor behind it changes when it is restarted."""

    worker_id: int
    handle: object = None
    address: str | None = None
    metrics_address: str | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)
    generation: int = 0
    restarts: int = 0
    healthy: bool = False


def initial_placement(cfg: ServiceConfig, num_layers: int, num_experts: int) -> Placement:
    slots = cfg.slots_per_worker or math.ceil(1.25 * num_experts / cfg.workers)
    if cfg.redundant_experts <= 0:
        return Placement.round_robin(num_layers, num_experts, cfg.workers, slots)
    # the first `redundant_experts` experts of each layer look hot: the planner gives them more replicas
    load = np.ones((num_layers, num_experts))
    load[:, : cfg.redundant_experts] = 2.0 * cfg.workers
    return plan(load, cfg.workers, slots)


class Controller:
    def __init__(self, config: dict) -> None:
        self.cfg = ServiceConfig.from_dict(config)
        self.uid = uuid.uuid4().hex[:6]  # keeps worker actor names unique across controllers
        self.args = open_source(self.cfg.model).args
        self.moe_layers = self.args.moe_layers
        self.version = 0
        self.placement: Placement | None = None
        self.workers: dict[int, WorkerSlot] = {}
        self.cond = asyncio.Condition()
        self.ready = False
        self.draining = False
        self.tasks: list[asyncio.Task] = []
        self.tls = (TLSConfig(self.cfg.tls_cert_file, self.cfg.tls_key_file, self.cfg.tls_ca_file)
                    if self.cfg.tls_cert_file else None)
        # load window: (time, gateway, counts [L, E]) reports; gateways' last seen table versions
        self.reports: deque[tuple[float, str, np.ndarray]] = deque()
        self.gateway_versions: dict[str, int] = {}
        self.targets: dict[str, dict] = {}  # metrics targets: key -> {"address", "labels"}
        self.metrics = ControllerMetrics(expert_series=self.cfg.expert_metrics)
        self.autoscale = AutoscaleSettings(**self.cfg.autoscaling) if self.cfg.autoscaling else None
        self.autoscale_state: AutoscaleState | None = None
        self.rebalance_lock = asyncio.Lock()
        self.last_rebalance: dict = {}
        self.http = self._start_http()

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.placement.slots_per_worker if self.placement else 0

    def _pairs(self, placement: Placement, worker_id: int) -> list[tuple[int, int]]:
        return [(self.moe_layers[l], e) for l, e in placement.hosted(worker_id)]

    def _actor_name(self, slot: WorkerSlot) -> str:
        return f"moe_worker_{self.uid}_{slot.worker_id}_{slot.generation}"

    async def _spawn(self, slot: WorkerSlot, pairs: list[tuple[int, int]]) -> None:
        cfg = self.cfg
        slot.generation += 1
        opts: dict = {"num_gpus": cfg.gpus_per_worker, "num_cpus": cfg.cpus_per_worker,
                      "name": self._actor_name(slot), "namespace": NAMESPACE}
        if cfg.worker_resources:
            opts["resources"] = dict(cfg.worker_resources)
        if cfg.spread_workers:
            opts["scheduling_strategy"] = "SPREAD"
        handle = ExpertWorkerActor.options(**opts).remote(
            slot.worker_id, cfg.model, cfg.dtype, self.slots, cfg.expert_bind_host, self.tls, cfg.torch_threads)
        slot.handle, slot.pairs = handle, list(pairs)
        try:
            addrs = await asyncio.wait_for(handle.start.remote(slot.pairs), cfg.worker_start_timeout_s)
        except asyncio.TimeoutError:
            ray.kill(handle)
            raise RuntimeError(
                f"expert worker {slot.worker_id} did not start within {cfg.worker_start_timeout_s:.0f}s; it asks for "
                f"{cfg.gpus_per_worker} GPU(s) and {cfg.worker_resources or 'no custom resources'}: does the cluster "
                f"have (or can its autoscaler add) a node with them?") from None
        except Exception as e:
            ray.kill(handle)
            raise RuntimeError(f"expert worker {slot.worker_id} failed to start: {e}") from e
        slot.address, slot.metrics_address = addrs["address"], addrs["metrics"]
        self.targets[f"worker-{slot.worker_id}"] = {
            "address": slot.metrics_address, "labels": {"component": "expert_worker", "worker": str(slot.worker_id)}}
        slot.healthy = True
        self.metrics.worker_up.labels(str(slot.worker_id)).set(1)

    async def start(self) -> dict:
        """Place the experts, start every worker, publish table version 1. Fails loudly."""
        if self.ready:
            return self.table()
        self.placement = initial_placement(self.cfg, len(self.moe_layers), self.args.n_routed_experts)
        self.workers = {w: WorkerSlot(w) for w in range(self.cfg.workers)}
        results = await asyncio.gather(*(self._spawn(s, self._pairs(self.placement, w))
                                         for w, s in self.workers.items()), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for s in self.workers.values():
                if s.handle is not None:
                    ray.kill(s.handle)
            raise errors[0]
        if self.autoscale is not None:
            self.autoscale_state = AutoscaleState.initial(self.autoscale, len(self.workers))
        self._export_placement()
        await self._publish(ready=True)
        loop = self.loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._monitor())]
        if self.cfg.rebalance_interval_s > 0:
            self.tasks.append(loop.create_task(self._rebalance_loop()))
        if self.autoscale is not None:
            self.tasks.append(loop.create_task(self._autoscale_loop()))
        return self.table()

    async def _publish(self, ready: bool | None = None) -> None:
        async with self.cond:
            if ready is not None:
                self.ready = ready
            self.version += 1
            self.metrics.version.set(self.version)
            self.metrics.workers.set(sum(s.healthy for s in self.workers.values()))
            self.cond.notify_all()

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)  # a polling period, not a synchronisation
            for slot in list(self.workers.values()):
                await self._check(slot)

    async def _check(self, slot: WorkerSlot) -> None:
        if slot.handle is None:
            return
        try:
            await asyncio.wait_for(slot.handle.ping.remote(), timeout=max(2.0, 4 * self.cfg.health_interval_s))
            return
        except (RayActorError, asyncio.TimeoutError, GetTimeoutError) as e:
            log.warning("expert worker %s is gone (%s); restarting it", slot.worker_id, type(e).__name__)
        if not slot.healthy or slot.worker_id not in self.workers:
            return
        slot.healthy = False
        self.metrics.worker_up.labels(str(slot.worker_id)).set(0)
        await self._publish()  # gateways stop routing to it right away
        while not self.draining and slot.worker_id in self.workers:
            try:
                await self._spawn(slot, slot.pairs)
                slot.restarts += 1
                self.metrics.restarts.inc()
                await self._publish()
                return
            except RuntimeError as e:
                log.error("restarting expert worker %s failed: %s", slot.worker_id, e)
                await asyncio.sleep(1.0)

    async def report_unavailable(self, worker_id: int) -> None:
        """A gateway could not reach a worker: check it now instead of at the next tick."""
        slot = self.workers.get(worker_id)
        if slot is not None and slot.healthy:
            await self._check(slot)

    async def drain(self) -> None:
        """Gateways report NOT_SERVING from now on (before a shutdown or a rollout)."""
        self.draining = True
        await self._publish()

    async def shutdown(self) -> None:
        self.draining = True
        for t in self.tasks:
            t.cancel()
        for slot in self.workers.values():
            if slot.handle is not None:
                try:
                    await asyncio.wait_for(slot.handle.stop.remote(), 5)
                except Exception:
                    pass
                ray.kill(slot.handle)
        self.workers = {}
        await self._publish(ready=False)
        self.http.shutdown()

    # ---- load window, rebalancing, autoscaling ------------------------------------------------

    def report_load(self, gateway: str, counts: list[list[int]], table_version: int, metrics_address: str | None) -> None:
        """A gateway's routed-token counts `[L, E]` since its last report, and the table it routes with."""
        now = time.monotonic()
        self.reports.append((now, gateway, np.asarray(counts, dtype=np.float64)))
        self.gateway_versions[gateway] = table_version
        if metrics_address:
            self.targets[f"gateway-{gateway}"] = {"address": metrics_address,
                                                  "labels": {"component": "gateway", "replica": gateway}}
        while self.reports and self.reports[0][0] < now - self.cfg.load_window_s:
            self.reports.popleft()

    def window_load(self) -> np.ndarray:
        """Routed tokens per (MoE layer, expert) over the window: `[L, E]`."""
        total = np.zeros((len(self.moe_layers), self.args.n_routed_experts))
        cutoff = time.monotonic() - self.cfg.load_window_s
        for t, _, counts in self.reports:
            if t >= cutoff:
                total += counts
        return total

    def _export_placement(self, load: np.ndarray | None = None) -> None:
        p = self.placement
        if p is None:
            return
        counts = p.replica_counts()
        for l in range(p.num_layers):
            if self.metrics.expert_series == "expert":
                for e in range(p.num_experts):
                    self.metrics.replicas.labels(str(self.moe_layers[l]), str(e)).set(counts[l, e])
            elif self.metrics.expert_series == "layer":
                self.metrics.replicas.labels(str(self.moe_layers[l])).set(counts[l].sum())
        if load is not None and load.sum() > 0:
            for l, b in enumerate(p.balancedness(load)):
                self.metrics.balancedness.labels(str(self.moe_layers[l])).set(float(b))

    def plan_rebalance(self, num_workers: int | None = None) -> dict:
        """The placement the current load window asks for, and its expected quality; applies nothing."""
        load = self.window_load()
        W = num_workers or len(self.workers)
        new = plan(load if load.sum() > 0 else np.ones_like(load), W, self.slots, current=self.placement)
        before = self.placement.balancedness(load) if load.sum() > 0 else np.ones(len(self.moe_layers))
        after = new.balancedness(load) if load.sum() > 0 else np.ones(len(self.moe_layers))
        return {"placement": new.to_dict(), "balancedness_before": before.tolist(),
                "balancedness_after": after.tolist(), "moves": new.moves_from(self.placement) if
                new.num_workers == self.placement.num_workers else None, "workers": W,
                "load_tokens": float(load.sum())}

    async def rebalance(self, dry_run: bool = False, force: bool = False, num_workers: int | None = None) -> dict:
        """Re-plan from the load window and apply it without stopping service:
        load new replicas (next to the old ones), publish the table, wait until every gateway routes
        with it, then drop replicas that moved away."""
        async with self.rebalance_lock:
            proposal = self.plan_rebalance(num_workers)
            gain = float(np.mean(proposal["balancedness_after"]) - np.mean(proposal["balancedness_before"]))
            proposal["gain"] = gain
            changes = num_workers is not None and num_workers != len(self.workers)
            if dry_run or (not force and not changes and gain < self.cfg.rebalance_min_gain):
                proposal["applied"] = False
                return proposal
            t0 = time.perf_counter()
            new = Placement.from_dict(proposal["placement"])
            proposal["gateways_switched"] = await self._apply(new)
            self.metrics.rebalances.inc()
            self.metrics.rebalance_seconds.observe(time.perf_counter() - t0)
            self._export_placement(self.window_load())
            proposal.update(applied=True, seconds=time.perf_counter() - t0, version=self.version)
            self.last_rebalance = {k: v for k, v in proposal.items() if k != "placement"}
            return proposal

    async def _apply(self, new: Placement) -> bool:
        """Returns whether every recently reporting gateway confirmed the new version before the bound."""
        # 1. new workers start, existing ones load what they gain while keeping what they lose
        for w in range(new.num_workers):
            if w not in self.workers:
                self.workers[w] = WorkerSlot(w)
                await self._spawn(self.workers[w], self._pairs(new, w))
        loads = []
        for w, slot in self.workers.items():
            keep = set(slot.pairs)
            union = sorted(keep | set(self._pairs(new, w)) if w < new.num_workers else keep)
            if union != slot.pairs:
                loads.append(slot.handle.load.remote(union))
                slot.pairs = union
        await self._loaded(loads)
        # 2. publish: gateways switch between steps
        self.placement = new
        await self._publish()
        # 3. wait (bounded) until every gateway that reported recently routes with the new version
        version, deadline = self.version, time.monotonic() + 30.0
        switched = False
        while time.monotonic() < deadline:
            recent = {g for t, g, _ in self.reports if t > time.monotonic() - 10.0}
            if all(self.gateway_versions.get(g, 0) >= version for g in recent):
                switched = True
                break
            await asyncio.sleep(0.1)  # gateways confirm a new version as soon as they route with it
        # 4. drop replicas that moved away; stop workers beyond the new count
        drops = []
        for w, slot in list(self.workers.items()):
            if w >= new.num_workers:
                self.workers.pop(w)
                self.targets.pop(f"worker-{w}", None)
                self.metrics.worker_up.remove(str(w))
                try:
                    await asyncio.wait_for(slot.handle.stop.remote(), 5)
                except Exception:
                    pass
                ray.kill(slot.handle)
                continue
            final = self._pairs(new, w)
            if final != slot.pairs:
                drops.append(slot.handle.load.remote(final))
                slot.pairs = final
        await self._loaded(drops)
        await self._publish()
        return switched

    @staticmethod
    async def _loaded(calls: list) -> None:
        """Awaits workers' loads. One that died meanwhile is not an error here: the monitor restarts it
        with its `pairs`, which already say what it must host."""
        for r in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(r, BaseException) and not isinstance(r, RayActorError):
                raise r

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
        assert self.autoscale is not None and self.autoscale_state is not None
        now = time.monotonic()
        tokens = sum(c.sum() for t, _, c in self.reports if t > now - interval_s)
        observed = tokens / max(interval_s, 1e-6) / max(1, self.args.num_experts_per_tok)
        desired, self.autoscale_state = decide(self.autoscale, self.autoscale_state, now, observed)
        self.metrics.workers_target.set(desired)
        if desired != len(self.workers):
            log.info("autoscaling expert workers %d -> %d (load %.1f tokens/s)", len(self.workers), desired, observed)
            await self.rebalance(num_workers=desired, force=True)
        return {"observed_tokens_per_s": observed, "desired": desired, "workers": len(self.workers)}

    # ---- what gateways and operators read -------------------------------------------------------

    def table(self) -> dict:
        p = self.placement
        routes = {}
        if p is not None:
            for i, layer in enumerate(self.moe_layers):
                reps = [p.replicas(i, e) for e in range(self.args.n_routed_experts)]
                shares = [[s for _, s in p.share(i, e)] for e in range(self.args.n_routed_experts)]
                routes[layer] = {"replicas": reps, "shares": shares}
        healthy = {w: s.address for w, s in self.workers.items() if s.healthy and s.address}
        covered = p is not None and all(
            any(w in healthy for w in p.replicas(i, e))
            for i in range(len(self.moe_layers)) for e in range(self.args.n_routed_experts))
        return {"version": self.version, "routes": routes, "addresses": healthy, "ready": self.ready and covered,
                "draining": self.draining}

    async def wait_for_table(self, newer_than: int, timeout_s: float = 10.0) -> dict:
        """Long poll: returns as soon as the version is above `newer_than`, or after the timeout."""
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: self.version > newer_than), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.table()

    def worker_info(self) -> list[dict]:
        return [{"worker_id": w, "address": s.address, "healthy": s.healthy, "restarts": s.restarts,
                 "generation": s.generation, "experts": len(s.pairs), "metrics": s.metrics_address,
                 "actor_name": self._actor_name(s)} for w, s in sorted(self.workers.items())]

    def stats(self) -> dict:
        """Per-worker expected load and the hottest experts over the load window (`moe-service stats`)."""
        load = self.window_load()
        out: dict = {"version": self.version, "window_s": self.cfg.load_window_s, "workers": self.worker_info(),
                     "load_tokens": float(load.sum()), "last_rebalance": self.last_rebalance}
        if self.placement is not None:
            wl = self.placement.worker_load(load)  # [L, W]
            out["worker_load"] = wl.sum(axis=0).tolist()
            out["balancedness"] = dict(zip(map(str, self.moe_layers), self.placement.balancedness(load).tolist()))
            order = np.argsort(load, axis=None)[::-1][:10]
            out["hottest"] = [{"layer": self.moe_layers[int(i) // load.shape[1]], "expert": int(i) % load.shape[1],
                               "tokens": float(load.flat[i]),
                               "replicas": len(self.placement.replicas(int(i) // load.shape[1], int(i) % load.shape[1]))}
                              for i in order if load.flat[i] > 0]
            out["placement"] = {str(w): [list(p) for p in self._pairs(self.placement, w)] for w in self.workers}
        return out

    def http_address(self) -> str:
        host, port = self.http.server_address[:2]
        return f"{host}:{port}"

    def config(self) -> dict:
        return self.cfg.to_dict()

    # ---- HTTP: Prometheus service discovery, the controller's own metrics, stats -----------------

    def _start_http(self) -> ThreadingHTTPServer:
        controller = self
        host = self.cfg.expert_bind_host or ray.util.get_node_ip_address()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                url = urllib.parse.urlparse(self.path)
                q = urllib.parse.parse_qs(url.query)
                if url.path != "/rebalance" or getattr(controller, "loop", None) is None:
                    self.send_error(404, "POST /rebalance[?dry_run=1]")
                    return
                dry = q.get("dry_run", ["0"])[0] in ("1", "true")
                fut = asyncio.run_coroutine_threadsafe(controller.rebalance(dry_run=dry, force=not dry), controller.loop)
                self._reply(json.dumps(fut.result(600)).encode(), "application/json")

            def _reply(self, body: bytes, ctype: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                if path == "/targets":
                    body = json.dumps([{"targets": [t["address"]], "labels": t["labels"]}
                                       for t in list(controller.targets.values())]).encode()
                    ctype = "application/json"
                elif path == "/metrics":
                    body, ctype = generate_latest(controller.metrics.registry), "text/plain; version=0.0.4"
                elif path == "/stats":
                    body, ctype = json.dumps(controller.stats()).encode(), "application/json"
                else:
                    self.send_error(404, "try /targets, /metrics or /stats (GET), /rebalance (POST)")
                    return
                self._reply(body, ctype)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer((host, self.cfg.sd_port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="controller-http", daemon=True).start()
        # the controller lists itself too
        self.targets["controller"] = {"address": f"{host}:{server.server_address[1]}",
                                      "labels": {"component": "controller"}}
        return server


ControllerActor = ray.remote(num_cpus=0, max_concurrency=64)(Controller)


def get_or_create_controller(config: dict, start_timeout_s: float | None = None):
    """The named detached controller for this config (created if absent) after `start()` succeeded."""
    # pinned to the head node (as Serve pins its own controller): it must outlive any worker node
    handle = ControllerActor.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        resources={"node:__internal_head__": 0.001}).remote(config)
    running = ServiceConfig.from_dict(ray.get(handle.config.remote())).to_dict()
    if running != ServiceConfig.from_dict(config).to_dict():
        changed = sorted(k for k, v in ServiceConfig.from_dict(config).to_dict().items() if running.get(k) != v)
        raise RuntimeError(
            f"a controller with other settings ({changed}) is already running in namespace {NAMESPACE!r}; "
            f"to change them, drain and shut it down first (docs/deploy.md, 'Rolling out a new model')")
    ray.get(handle.start.remote(), timeout=start_timeout_s)
    return handle


def get_controller():
    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
