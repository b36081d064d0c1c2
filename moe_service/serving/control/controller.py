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
from moe_service.engine.speculative import Speculative
from moe_service.serving.metrics import ControllerMetrics
from moe_service.placement import AutoscaleSettings, AutoscaleState, Placement, decide
from moe_service.capacity.costmodel import expert_bytes
from moe_service.model.args import DTYPES
from moe_service.placement.redundancy import actives, live_replicas, redundancy_fits, standby_slots, with_standbys
from moe_service.serving.config import CONTROLLER_NAME, ServiceConfig
from moe_service.serving.control.http import Routes, serve_http
from moe_service.serving.control.pool import Launcher, Pairs, Worker, WorkerPool
from moe_service.serving.control.rebalance import Gateways, ProtocolSettings, apply_placement, load_view, propose
from moe_service.serving.control.table import TableBoard, initial_placement, rebuild_placement
from moe_service.serving.control.window import LoadWindow

log = logging.getLogger("moe_service.controller")


class Controller:
    def __init__(self, config: dict, launcher: Launcher | None = None, recovering: bool | None = None) -> None:
        cfg = self.cfg = ServiceConfig.from_dict(config)
        source = open_source(cfg.model)
        self.args = source.args
        Speculative.from_setting(cfg.speculative, self.args)  # a bad setting fails the start, naming it
        self.moe_layers = cfg.routed_layers(self.args)
        # one routed expert's bytes on a worker (FP8: one byte a weight), until the workers report theirs
        self.replica_bytes = expert_bytes(self.args, 1 if cfg.quantize == "fp8" or source.fp8 else DTYPES[cfg.dtype].itemsize)
        # every expert on this many workers: the setting, or decided at start on the workers' memory (`_redundancy`)
        self.min_replicas, self.redundancy = cfg.min_replicas or 1, "set" if cfg.min_replicas else "not decided yet"
        self.replicas_per_worker = self.slots_for(cfg.workers)
        self.worker_seconds = cfg.worker_seconds(self.args) if cfg.rebalance_objective == "time" else None
        if launcher is None or recovering is None:
            from moe_service.serving.control.ray_launcher import RayLauncher

            service = ray.get_runtime_context().get_actor_name() or CONTROLLER_NAME
            launcher = launcher or RayLauncher(cfg, cfg.tls(), service)
            # a Ray actor restarted after its loss: the workers are still running, find them
            recovering = ray.get_runtime_context().was_current_actor_reconstructed if recovering is None else recovering
        self.launcher, self.recovering = launcher, recovering
        self.pool = WorkerPool(launcher, self._republish)
        self.window = LoadWindow(cfg.load_window_s)
        self.gateways = Gateways()
        self.protocol = ProtocolSettings(cfg.confirm_timeout_s, cfg.gateway_recent_s)
        self.board = TableBoard(self.moe_layers, self.args.n_routed_experts, self.pool.healthy_addresses)
        self.targets: dict[str, dict] = {}  # metrics targets: key -> {"address", "labels"}
        self.metrics = ControllerMetrics(expert_series=cfg.expert_metrics)
        self.autoscale = AutoscaleSettings(**cfg.autoscaling) if cfg.autoscaling else None
        self.autoscale_state: AutoscaleState | None = None
        self.rebalance_lock = asyncio.Lock()
        self.last_rebalance: dict = {}
        self.tasks: list[asyncio.Task] = []
        self.http: asyncio.AbstractServer | None = None
        self._up_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self.degraded_since: float | None = None  # when some expert fell below min_replicas

    # ---- lifecycle ---------------------------------------------------------------------------

    def slots_for(self, num_workers: int, min_replicas: int | None = None) -> int:
        """Replicas per worker and layer: `replicas_per_worker`, or every expert once + 25% and room for the
        standbys (min_replicas), on the workers the service starts with or on `num_workers` if fewer."""
        if self.cfg.replicas_per_worker:
            return self.cfg.replicas_per_worker
        E, m = self.args.n_routed_experts, min_replicas or self.min_replicas
        return max(math.ceil(1.25 * E / w) + standby_slots(E, w, m) for w in (self.cfg.workers, num_workers))

    def _redundancy(self, described: dict[int, dict | None]) -> None:
        """`min_replicas` unset: 2 where the fewest workers the service runs are 2 or more and their memory holds
        the experts with a standby each (`redundancy_fits`: at most 80% of what they have for experts), else 1.
        Decided once, on the workers' own reports (at start, empty; after a controller restart, loaded)."""
        if self.cfg.min_replicas is not None:
            return
        fewest = min(self.cfg.workers, (self.cfg.autoscaling or {}).get("min_workers", self.cfg.workers))
        if fewest < 2:
            self.min_replicas, self.redundancy = 1, f"auto: 1 (the service may run {fewest} worker)"
        else:
            per_layer = len(self.moe_layers) * self.replica_bytes
            spare = standby_slots(self.args.n_routed_experts, self.cfg.workers, 2) * per_layer
            serving = self.slots_for(self.cfg.workers, 2) * per_layer - spare
            # what each worker would hold, and where: its device, and with `standby: host` its node's memory
            needs: list = []
            for info in described.values():
                info = info or {}
                if self.cfg.standby == "host":
                    needs += [(info.get("memory"), serving), (info.get("host_memory"), spare)]
                else:
                    needs.append((info.get("memory"), serving + spare))
            fits, why = redundancy_fits(needs)
            self.min_replicas, self.redundancy = (2 if fits else 1), f"auto: {2 if fits else 1} ({why})"
        self.replicas_per_worker = self.slots_for(self.cfg.workers)
        log.info("min_replicas %s", self.redundancy)

    def pairs_of(self, placement: Placement, worker_id: int) -> Pairs:
        return [(self.moe_layers[l], e) for l, e in placement.hosted(worker_id)]

    def standbys_of(self, placement: Placement, worker_id: int) -> Pairs:
        """Which of `pairs_of` are standbys (hosted with no share: placement/redundancy.py) that the worker is to
        keep in host memory (`standby: host`; with `device` it need not know)."""
        if self.cfg.standby != "host" or worker_id >= placement.num_workers:
            return []
        spare = placement.hosts[:, :, worker_id] & ~actives(placement).hosts[:, :, worker_id]
        return [(self.moe_layers[l], int(e)) for l, e in np.argwhere(spare)]

    async def start(self) -> dict:
        """Place the experts, start every worker, publish the first ready table. Fails loudly. Every gateway
        replica calls it as it starts; the first does the work, the others wait for its table."""
        async with self._start_lock:
            await self._up()
            if self.board.ready:
                return self.board.snapshot()
            # the workers start empty, say what memory they have (min_replicas unset is decided on it), then load
            workers = range(self.cfg.workers)
            await self._all_or_none(self.pool.start(w, []) for w in workers)
            self._redundancy(await self.pool.describe())
            placement = initial_placement(self.cfg.workers, self.cfg.redundant_experts, len(self.moe_layers),
                                          self.args.n_routed_experts, self.replicas_per_worker, self.min_replicas)
            await self._all_or_none(self._first_load(w, placement) for w in workers)
            self._began(placement)
            await self.publish(placement, ready=True)
            return self.board.snapshot()

    async def _all_or_none(self, steps) -> None:
        """Every step, or none of the workers left running: the first error is raised."""
        results = await asyncio.gather(*steps, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.pool.stop_all()
            raise errors[0]

    async def _first_load(self, worker_id: int, placement: Placement) -> None:
        try:
            await self.pool.load({worker_id: self.pairs_of(placement, worker_id)},
                                 {worker_id: self.standbys_of(placement, worker_id)})
        except Exception as e:
            raise RuntimeError(f"expert worker {worker_id} failed to start: {e}") from e

    def _began(self, placement: Placement) -> None:
        self.board.placement = placement
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
        self._redundancy(await self.pool.describe())
        placement, lost = rebuild_placement({f.worker_id: f.pairs for f in found}, self.moe_layers,
                                            self.args.n_routed_experts, self.cfg.workers, self.replicas_per_worker,
                                            {f.worker_id: f.standbys for f in found})
        # experts left below min_replicas by the loss get standbys, on the emptiest workers: the lost ones
        placement = with_standbys(placement, self.min_replicas, self.replicas_per_worker)
        for w in lost:  # a generation no earlier process of it can have had
            await self.pool.start(w, self.pairs_of(placement, w), max([0, *(f.generation for f in found)]) + 1,
                                  self.standbys_of(placement, w))
        log.warning("controller restarted: adopted %d running workers, restarted %d", len(found), len(lost))
        self.recovering = False
        self._began(placement)
        # versions count publications, a few a second at most: milliseconds of the clock are above any
        # version the lost controller gave out (and `_saw_version` covers a clock that went back)
        self.board.at_least(int(time.time() * 1000))
        await self.publish(placement, ready=True)

    @property
    def placement(self) -> Placement | None:
        return self.board.placement

    @property
    def version(self) -> int:
        return self.board.version

    async def publish(self, placement: Placement | None = None, ready: bool | None = None,
                      draining: bool | None = None) -> int:
        """A new table version (gateways long-poll for it); returns the version."""
        version = await self.board.publish(placement, ready, draining)
        if placement is not None:
            self._export_placement()
        self.metrics.version.set(version)
        self.metrics.workers.set(sum(w.healthy for w in self.pool.workers.values()))
        if self.placement is not None:
            self._count_redundancy()
        for w in self.pool.workers.values():
            self.metrics.worker_up.labels(str(w.worker_id)).set(int(w.healthy))
            self._target(w)
        return version

    def _count_redundancy(self) -> None:
        """Experts below min_replicas on the healthy workers; how long redundancy took to come back."""
        healthy = {w.worker_id for w in self.pool.workers.values() if w.healthy}
        under = int((live_replicas(self.placement, healthy) < self.min_replicas).sum())
        self.metrics.under_replicated.set(under)
        if under and self.degraded_since is None:
            self.degraded_since = time.monotonic()
        elif not under and self.degraded_since is not None:
            self.metrics.redundancy_restored.observe(time.monotonic() - self.degraded_since)
            self.degraded_since = None

    async def _republish(self) -> None:
        if self.placement is not None:
            await self.publish()

    async def _saw_version(self, version: int) -> None:
        """A gateway holds a version above this controller's (a clock that went back across a restart):
        a gateway only takes a table newer than its own, so the next one gets a higher number."""
        if version > self.version and self.placement is not None:
            self.board.at_least(version)
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
        await self.publish(draining=True)

    async def shutdown(self) -> None:
        self.board.draining = True
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
        """The placement the current load window asks for, and its expected gain; applies nothing."""
        by_time = None
        if self.worker_seconds is not None:
            by_time = (self.worker_seconds, self.cfg.tokens_per_call() * self.args.num_experts_per_tok)
        num_workers = num_workers or len(self.pool.workers)
        return propose(self.window_load(), self.placement, num_workers, self.slots_for(num_workers),
                       self.cfg.rebalance_objective, by_time, self.min_replicas)

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
                                                                  self.gateways, self.protocol, self.standbys_of)
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
        return self.board.snapshot()

    async def wait_for_table(self, newer_than: int, timeout_s: float = 10.0) -> dict:
        """Long poll: returns as soon as the version is above `newer_than`, or after the timeout."""
        await self._up()
        await self._saw_version(newer_than)
        return await self.board.wait(newer_than, timeout_s)

    async def worker_info(self) -> list[dict]:
        """Each worker's state, as operators and tests read it."""
        await self._up()
        return self._worker_info()

    def _worker_info(self) -> list[dict]:
        name = getattr(self.launcher, "name", lambda w, g: None)
        p = self.placement
        # standbys: what min_replicas costs a worker (placement/redundancy.py), at the bytes a replica takes
        # there as the worker last said (its experts' tensors, FP8 scales included)
        standby = (p.hosts & ~actives(p).hosts).sum(axis=(0, 1)) if p is not None else np.zeros(0, dtype=int)
        out = []
        for w, s in sorted(self.pool.workers.items()):
            n = int(standby[w]) if w < len(standby) else 0
            held = (s.info or {}).get("expert_bytes")
            replica = held / len(s.info["hosted"]) if held and s.info.get("hosted") else self.replica_bytes
            out.append({"worker_id": w, "address": s.address, "healthy": s.healthy, "restarts": s.restarts,
                        "generation": s.generation, "experts": len(s.pairs), "metrics": s.metrics, "standbys": n,
                        "standby_bytes": int(n * replica), "actor_name": name(w, s.generation)})
        return out

    def _targets(self) -> list[dict]:
        return [{"targets": [t["address"]], "labels": t["labels"]} for t in self.targets.values()]

    def stats(self) -> dict:
        """Per-worker expected load and the hottest experts over the load window (`moe-service stats`)."""
        return {"version": self.version, "window_s": self.cfg.load_window_s, "workers": self._worker_info(),
                "min_replicas": self.min_replicas, "redundancy": self.redundancy,
                "last_rebalance": self.last_rebalance, **load_view(self.window_load(), self.placement, self.moe_layers,
                                                                 {w: self.pairs_of(self.placement, w) for w in self.pool.workers}
                                                                 if self.placement is not None else {})}

    async def http_address(self) -> str:
        """The HTTP surface's host:port."""
        await self._up()
        return self._http_address()

    def _http_address(self) -> str:
        host, port = self.http.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    def config_digest(self) -> str:
        """Which settings this controller runs with, without showing them (they may hold keys)."""
        return settings_digest(self.cfg)

    def settings(self) -> dict:
        return self.cfg.redacted()


def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def settings_digest(cfg: ServiceConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
