"""The gateway: embeddings, MLA attention with the KV cache, gates, shared experts, LM head and the engine,
with the routed experts called on the workers. A plain class that puts the parts together (the model, the
engine and its thread, the remote experts, the controller's table and load reports, the request API);
the Serve deployment in deployment.py wraps it, and tests can build it directly."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from typing import AsyncIterator

import torch
from grpc_health.v1 import health_pb2

from moe_service.checkpoint import load_model, open_source
from moe_service.engine.clock import StepClock
from moe_service.engine.engine import Engine, StepStats
from moe_service.engine.loop import EngineLoop
from moe_service.engine.speculative import Speculative
from moe_service.engine.tokenizer import load_tokenizer
from moe_service.model.args import DTYPES
from moe_service.serving.config import ServiceConfig
from moe_service.serving.gateway.remote import RemoteExperts
from moe_service.serving.gateway.requests import RequestAPI
from moe_service.serving.gateway.table import ControllerLink, RoutingCounter, TableFollower, report_load
from moe_service.serving.metrics import GatewayMetrics, serve_metrics
from moe_service.serving.simulated import route_by_trace
from moe_service.transport.memory import keep_large_buffers


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


class Gateway:
    """Built in two steps: the constructor loads the model (blocking, seconds); `start()` waits for the
    controller's first ready table and starts the engine, on the event loop that then runs the gateway's
    control tasks (following the table, reporting load). Steps run on the engine thread and its
    micro-batch threads, each talking to the workers through its own dispatcher."""

    def __init__(self, config: dict, controller: ControllerLink) -> None:
        cfg = self.cfg = ServiceConfig.from_dict(config)
        if cfg.gateway_torch_threads:
            torch.set_num_threads(cfg.gateway_torch_threads)
        keep_large_buffers()  # a large dispatch's buffers are reused, not mapped afresh per call
        source = open_source(cfg.model)
        self.spec = Speculative.from_setting(cfg.speculative, source.args)
        # the device a replica sees decides where it computes (Ray's logical GPUs, as in the tests, are not one)
        self.device = torch.device(cfg.gateway_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(source, dtype=DTYPES[cfg.dtype], device=self.device, with_routed_experts=False,
                                with_mtp=self.spec is not None)
        self.source_reads = list(source.reads)  # tests check that no routed expert was read
        self.args = self.model.args
        self.routed_layers = cfg.routed_layers(self.args)
        self.tokenizer = load_tokenizer(cfg.model, self.args)
        self.replica_id = uuid.uuid4().hex[:8]
        self.metrics = GatewayMetrics(expert_series=cfg.expert_metrics, workloads=cfg.workloads)
        sim = self.simulation = cfg.simulation()
        if sim is not None:
            sim.export(self.metrics.registry)
            router = sim.trace(self.args)
            if router is not None:  # a simulated cluster may route by a trace instead of the gate
                route_by_trace(self.model, router)
        host = cfg.expert_bind_host or _node_ip()
        self.metrics_address = f"{host}:{serve_metrics(self.metrics.registry, host=host)}"
        self.counter = RoutingCounter(self.routed_layers, self.args.n_routed_experts, len(self.metrics.workloads))
        self.api_key = cfg.resolved_api_key()
        self.controller = controller
        self.follower = TableFollower(controller)
        self.api = RequestAPI(self)
        self.tasks: list[asyncio.Task] = []
        self.closed = False
        self._counted: dict[str, int] = {}  # the engine's counters as the metrics last saw them

    async def start(self) -> None:
        cfg, m = self.cfg, self.metrics
        table = await asyncio.wait_for(self.follower.first(), cfg.worker_start_timeout_s)
        overlap, _ = cfg.overlap()
        # a SIMULATED cluster holds its answers for dilated time: so are its messages' deadlines
        dilate = self.simulation.time_scale if self.simulation is not None else 1.0
        self.remote = RemoteExperts(table, call_timeout_s=cfg.expert_call_timeout_s, overlap=overlap,
                                    message_timeout_s=cfg.expert_message_timeout_s * dilate,
                                    row_timeout_s=cfg.expert_row_timeout_s * dilate,
                                    wait_for_table=self.follower.wait_for_table, tls=cfg.tls())
        self.engine = Engine(self.model, self.tokenizer, cfg.scheduler_config(), dispatchers=self.remote.dispatcher,
                             workload_rows=bool(cfg.workloads), speculative=self.spec)
        self.forward_dispatcher = self.remote.dispatcher()  # Forward requests, run between steps
        m.queue_capacity.set(self.engine.config.max_queue)
        m.kv_capacity.set(self.engine.config.capacity)
        self.engine_loop = EngineLoop(self.engine, after_step=self._after_step)
        loop = asyncio.get_running_loop()
        stopped = lambda: self.closed  # noqa: E731
        report = lambda counts: self.controller.report_load(  # noqa: E731
            self.replica_id, counts, self.remote.table.version, self.metrics_address)
        self.tasks = [loop.create_task(t) for t in (
            self.follower.follow(self.engine_loop, self.remote, lambda: report(self._no_counts()), stopped),
            report_load(self.counter, m, self.routed_layers, report, cfg.load_report_interval_s, stopped),
            self._watch_loop())]

    def _no_counts(self) -> list:
        return [[0] * self.args.n_routed_experts for _ in self.routed_layers]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, deadline: float) -> torch.Tensor:
        """A Forward request's logits [B, T, V]; on the engine thread, between steps."""
        d = self.forward_dispatcher
        d.begin(deadline, StepClock(self.device))
        return self.model(ids, num_new=lengths, dispatcher=d).float()

    # ---- after each step (the engine thread) ----------------------------------------------------

    def _after_step(self, stats: StepStats) -> None:
        m = self.metrics
        for cause in stats.failures:
            m.step_failures.labels(cause).inc()
        if not stats.seconds:
            return
        m.step.observe(stats.seconds)
        m.step_rows.observe(stats.decode_rows + stats.prefill_rows)
        m.step_tokens.observe(stats.decode_rows + stats.prefill_tokens)
        if self.spec is not None:
            model = self.cfg.model_name()
            m.spec_draft.labels(model).inc(stats.drafted)
            m.spec_accepted.labels(model).inc(stats.accepted)
            for o in stats.outcomes:
                if not (o.prefill or o.error):  # a decoding sequence's tokens this step
                    for n in o.computed:
                        m.spec_step_tokens.labels(model).observe(n)
        s = self.engine.stats()
        m.running.set(s["running"])
        m.waiting.set(s["waiting"])
        m.kv_used.set(s["kv_used_tokens"])
        for state in ("used", "kept", "free"):
            m.kv_blocks.labels(state).set(s[f"kv_blocks_{state}"])
        for counter, key in ((m.prefix_query, "prefix_query_tokens"), (m.prefix_hit, "prefix_hit_tokens"),
                             (m.preemptions, "preemptions")):
            counter.inc(s[key] - self._counted.get(key, 0))
            self._counted[key] = s[key]
        stages: dict[str, float] = defaultdict(float)
        for o in stats.outcomes:
            for stage, seconds in o.stages.items():
                stages[stage] += seconds
        for stage, seconds in stages.items():
            m.stage.labels(stage).observe(seconds)
        records = [o.record for o in stats.outcomes if o.record is not None]
        self.counter.add(records)
        self._observe_calls(records)

    def _observe_calls(self, records: list) -> None:
        """Per worker, once per step: rows, bytes, retries and failures summed; each call's round trip and
        compute time observed."""
        m = self.metrics
        per_worker: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])  # rows, sent, received, retries, failures
        for r in records:
            for s in r.stalls:
                m.loss_stall.observe(s)
            for c in r.calls:
                w = str(c.worker)
                m.rpc.labels(w).observe(c.seconds)
                t = per_worker[c.worker]
                if c.ok:
                    m.rpc_compute.labels(w).observe(c.compute_seconds)
                    t[0] += c.rows
                    t[1] += c.bytes_sent
                    t[2] += c.bytes_received
                    t[3] += c.retried
                else:
                    t[4] += 1
        for worker, (rows, sent, received, retries, failures) in per_worker.items():
            w = str(worker)
            m.rows.labels(w).inc(rows)
            m.bytes_sent.labels(w).inc(sent)
            m.bytes_received.labels(w).inc(received)
            if retries:
                m.retries.labels(w).inc(retries)
            if failures:
                m.failures.labels(w).inc(failures)

    # ---- health (the event loop) -------------------------------------------------------------------

    async def _watch_loop(self, period_s: float = 0.05) -> None:
        """How late this loop runs a timer: every stream's tokens and the control tasks wait as long."""
        while not self.closed:
            t0 = time.monotonic()
            await asyncio.sleep(period_s)  # the measuring period
            self.metrics.loop_lag.observe(max(0.0, time.monotonic() - t0 - period_s))

    def accepting(self) -> bool:
        return not self.closed and not self.follower.info["draining"]

    def serving(self) -> bool:
        t = self.follower.info
        return not self.closed and t["ready"] and not t["draining"] and self.engine_loop.thread.is_alive()

    def health(self) -> health_pb2.HealthCheckResponse:
        s = health_pb2.HealthCheckResponse.SERVING if self.serving() else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=s)

    async def watch(self) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            now = self.health()
            if now.status != last:
                last = now.status
                yield now
            await asyncio.sleep(0.5)  # a polling period for a long-lived stream

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.follower.loop
        if loop is not None and not loop.is_closed():
            for t in self.tasks:
                loop.call_soon_threadsafe(t.cancel)
        if hasattr(self, "engine_loop"):
            self.engine_loop.stop()
            self.engine.close()
            self.remote.close()
