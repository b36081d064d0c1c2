"""The gateway: embeddings, MLA attention with the KV cache, gates, shared experts, LM head and the
continuous-batching scheduler; routed experts are called on the workers. A plain class: the Serve
deployment in app.py wraps it, and tests can build it directly."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable

import grpc
import torch
from grpc_health.v1 import health_pb2

from moe_service.checkpoint import load_model, open_source
from moe_service.engine.engine import check_tokens
from moe_service.serving.metrics import GatewayMetrics, serve_metrics
from moe_service.model.args import DTYPES
from moe_service.model.moe import ExpertBackend
from moe_service.model.summary import summarize
from moe_service.routing import LayerRoutes
from moe_service.engine.sampling import SamplingParams
from moe_service.engine.scheduler import EngineLoop, Rejected, Scheduler, StepDeadline
from moe_service.serving.config import ServiceConfig, key_matches
from moe_service.engine.tokenizer import load_tokenizer
from moe_service.transport.codec import encode
from moe_service.serving.gateway.remote import CallStats, RemoteExperts, RoutingTable
from moe_service.transport.memory import keep_large_buffers
from moe_service.transport.pb import moe_pb2

STATUS_OF = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
             "deadline": grpc.StatusCode.DEADLINE_EXCEEDED, "unavailable": grpc.StatusCode.UNAVAILABLE,
             "cancelled": grpc.StatusCode.CANCELLED, "internal": grpc.StatusCode.INTERNAL, "unauthenticated": grpc.StatusCode.UNAUTHENTICATED}
MAX_FORWARD_TOKENS = 8192
MAX_CHOICES = 16  # samples per request (n)
MAX_REQUEST_ID = 128


class GatewayError(Exception):
    """An error for the client: a gRPC status and a message that says what is allowed; with
    `retry_after_ms`, when a retry may succeed (sent as gRPC's grpc-retry-pushback-ms trailer)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms

    def __reduce__(self):  # Serve ships exceptions between processes
        return (GatewayError, (self.code, self.message, self.retry_after_ms))


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def routing_table(t: dict) -> RoutingTable:
    """The controller's table as the gateway routes with it; workers without an address are left out."""
    addresses = {int(w): a for w, a in t["addresses"].items()}
    routes = {}
    for layer, r in t["routes"].items():
        workers = {w for reps in r["replicas"] for w in reps}
        routes[int(layer)] = LayerRoutes(int(layer), r["replicas"], r["shares"]).without(workers - set(addresses))
    return RoutingTable(t["version"], routes, addresses)


@dataclass
class ControllerLink:
    """What the gateway needs from the controller, as plain async callables (tests may fake them)."""

    table: Callable[[], Awaitable[dict]]
    wait_for_table: Callable[[int, float], Awaitable[dict]]
    report_unavailable: Callable[[int], Awaitable[None]]
    report_load: Callable[[str, list, int, str | None], Awaitable[None]]


class Gateway:
    """Built in two steps: the constructor loads the model (blocking, seconds), `start()` waits for the
    controller's first ready table and starts the engine, on the event loop that then runs the
    gateway's control tasks (following the table, reporting load). Steps run on the engine thread
    and its micro-batch threads, each talking to the workers on its own streams."""

    def __init__(self, config: dict, controller: ControllerLink) -> None:
        cfg = self.cfg = ServiceConfig.from_dict(config)
        if cfg.gateway_torch_threads:
            torch.set_num_threads(cfg.gateway_torch_threads)
        keep_large_buffers()  # a large dispatch's buffers are reused, not mapped afresh per call
        source = open_source(cfg.model)
        # the device a replica sees decides where it computes (Ray's logical GPUs, as in the tests, are not one)
        self.device = torch.device(cfg.gateway_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(source, dtype=DTYPES[cfg.dtype], device=self.device, with_routed_experts=False)
        self.source_reads = list(source.reads)  # tests check that no routed expert was read
        self.args = self.model.args
        self.tokenizer = load_tokenizer(cfg.model, self.args)
        self.controller = controller
        self.replica_id = uuid.uuid4().hex[:8]
        self.metrics = GatewayMetrics(expert_series=cfg.expert_metrics, workloads=cfg.workloads)
        sim = cfg.simulation()
        if sim is not None:
            sim.export(self.metrics.registry)
        # a simulated cluster may route by a trace instead of the gate
        self.trace = sim.trace(self.args) if sim else None
        host = cfg.expert_bind_host or _node_ip()
        self.metrics_address = f"{host}:{serve_metrics(self.metrics.registry, host=host)}"
        # routed (token, expert) pairs per MoE layer since the last report to the controller, and the tokens
        # through each layer's gate (counted apart: the metric checks the routing, not a copy of it)
        self.layer_index = {layer: i for i, layer in enumerate(self.args.moe_layers)}
        self.counts = torch.zeros(len(self.args.moe_layers), self.args.n_routed_experts, dtype=torch.long)
        self.layer_tokens = [0] * len(self.args.moe_layers)
        # ... and per workload class (x-moe-workload), when the service lists some: [layer, workload, expert]
        self.workload_counts = torch.zeros(len(self.args.moe_layers), len(self.metrics.workloads),
                                           self.args.n_routed_experts, dtype=torch.long)
        self.counts_lock = threading.Lock()
        self.tls = cfg.tls()
        self.api_key = cfg.resolved_api_key()
        # the newest table the controller published (a step's own table is self.remote.table)
        self.latest: RoutingTable | None = None
        self.table_cond = threading.Condition()
        self.tasks: list[asyncio.Task] = []
        self.completions: deque[float] = deque(maxlen=4096)  # when recent requests finished (retry hints)
        self.closed = False

    async def start(self) -> None:
        cfg = self.cfg
        first = await asyncio.wait_for(self._fetch_ready_table(), cfg.worker_start_timeout_s)
        self.table_info = first
        self.latest = routing_table(first)
        self.remote = RemoteExperts(self.latest, call_timeout_s=cfg.expert_call_timeout_s,
                                    wait_for_table=self._wait_for_new_table, on_call=self._on_call,
                                    on_stage=self._on_stage, tls=self.tls)
        self.scheduler = Scheduler(self.model, cfg.scheduler_config(), self.tokenizer, backend=self._backend,
                                   hook=self._on_stage, workload_rows=bool(cfg.workloads))
        m, c = self.metrics, self.scheduler.config
        m.queue_capacity.set(c.max_queue)
        m.kv_capacity.set(c.capacity)
        self.engine = EngineLoop(self.scheduler, after_step=self._after_step)
        self.loop = asyncio.get_running_loop()
        self.tasks = [self.loop.create_task(t) for t in (self._poll_table(), self._report_load(), self._watch_loop())]

    # ---- the expert backend (on the thread that computes a micro-batch) -------------------------

    def _backend(self, deadline: float | None, workloads: torch.Tensor | None = None) -> ExpertBackend:
        """The expert backend of one micro-batch whose requests' latest deadline is `deadline`; `workloads`,
        each FFN row's workload index, when the service counts routing per workload."""
        send = self.remote.backend(deadline)
        E = self.args.n_routed_experts

        def experts(layer: int, x: torch.Tensor, weights: torch.Tensor,
                    experts: torch.Tensor) -> "torch.Tensor | Callable[[], torch.Tensor]":
            if self.trace is not None:
                experts = self.trace.route(layer, x, experts.shape[1])
            call = send(layer, x, weights, experts)
            counts = torch.bincount(call.experts.reshape(-1), minlength=E)  # on the host
            by_workload = None
            if workloads is not None:
                pairs = workloads.repeat_interleave(call.experts.shape[1]) * E + call.experts.reshape(-1)
                by_workload = torch.bincount(pairs, minlength=len(self.metrics.workloads) * E).view(-1, E)
            with self.counts_lock:
                self.counts[self.layer_index[layer]] += counts
                self.layer_tokens[self.layer_index[layer]] += x.shape[0]
                if by_workload is not None:
                    self.workload_counts[self.layer_index[layer]] += by_workload
            # with `overlap_shared_experts` the model runs the shared experts while the workers compute
            return call if self.cfg.overlap_shared_experts else call()

        return experts

    def _wait_for_new_table(self, excluded: set[int], version: int, wait_s: float) -> RoutingTable | None:
        """A table newer than `version` for a call that lost workers, or None after `wait_s`. It is that
        call's alone: the gateway switches its own table only between steps (the controller drops old
        replicas once every gateway routes with the new version, so a step in flight keeps its own)."""
        for w in excluded:
            self.loop.call_soon_threadsafe(self._spawn, self.controller.report_unavailable(w))
        with self.table_cond:
            self.table_cond.wait_for(lambda: self.latest.version > version, wait_s)
            latest = self.latest
        return latest if latest.version > version else None

    def _spawn(self, coro: Awaitable) -> None:
        """Runs a controller call in the background; a failure (the controller restarting) is dropped."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # ---- metrics ------------------------------------------------------------------------------

    def _on_stage(self, stage: str, seconds: float) -> None:
        self.metrics.stage.labels(stage).observe(seconds)

    def _on_call(self, c: CallStats) -> None:
        m, w = self.metrics, str(c.worker)
        m.rpc.labels(w).observe(c.seconds)
        if c.ok:
            m.rpc_compute.labels(w).observe(c.compute_seconds)
            m.rows.labels(w).inc(c.rows)
            m.bytes_sent.labels(w).inc(c.bytes_sent)
            m.bytes_received.labels(w).inc(c.bytes_received)
            if c.retried:
                m.retries.labels(w).inc()
        else:
            m.failures.labels(w).inc()

    def _after_step(self, stats) -> None:
        m = self.metrics
        for cause in stats.failures:
            m.step_failures.labels(cause).inc()
        if not stats.seconds:
            return
        m.step.observe(stats.seconds)
        m.step_rows.observe(stats.decode_rows + stats.prefill_rows)
        m.step_tokens.observe(stats.decode_rows + stats.prefill_tokens)
        s = self.scheduler.stats()
        m.running.set(s["running"])
        m.waiting.set(s["waiting"])
        m.kv_used.set(s["kv_used_tokens"])
        m.kv_reserved.set(s["kv_reserved_tokens"])

    # ---- control tasks (on the event loop that ran start()) ------------------------------------

    async def _report_load(self) -> None:
        # the first report goes out at once: it also registers this gateway's metrics endpoint as a
        # scrape target with the controller
        first = True
        while not self.closed:
            if not first:
                await asyncio.sleep(self.cfg.load_report_interval_s)  # the reporting period
            first = False
            with self.counts_lock:
                counts, self.counts = self.counts, torch.zeros_like(self.counts)
                tokens, self.layer_tokens = self.layer_tokens, [0] * len(self.layer_tokens)
                by_workload, self.workload_counts = self.workload_counts, torch.zeros_like(self.workload_counts)
            # routing metrics, here rather than per layer on the step's hot path
            for layer, row, n in zip(self.args.moe_layers, counts.tolist(), tokens):
                if n:
                    self.metrics.observe_routing(layer, row)
                    self.metrics.layer_tokens.labels(str(layer)).inc(n)
            for layer, rows in zip(self.args.moe_layers, by_workload.tolist()):
                for workload, row in zip(self.metrics.workloads, rows):
                    for e, n in enumerate(row):
                        if n:
                            self.metrics.routed_by_workload.labels(str(layer), str(e), workload).inc(n)
            try:
                await self.controller.report_load(self.replica_id, counts.tolist(), self.remote.table.version,
                                                  self.metrics_address)
            except Exception:  # the controller restarting: these counts are lost, the next ones arrive
                pass

    async def _watch_loop(self, period_s: float = 0.05) -> None:
        """How late this loop runs a timer: every stream's tokens and the control tasks wait as long."""
        while not self.closed:
            t0 = time.monotonic()
            await asyncio.sleep(period_s)  # the measuring period
            self.metrics.loop_lag.observe(max(0.0, time.monotonic() - t0 - period_s))

    async def _fetch_ready_table(self) -> dict:
        t = await self.controller.table()
        while not t["ready"]:
            t = await self.controller.wait_for_table(t["version"], 5.0)
        return t

    async def _poll_table(self) -> None:
        version = self.table_info["version"]
        while not self.closed:
            try:
                t = await self.controller.wait_for_table(version, 10.0)
            except Exception:  # the controller restarting: keep the table we have, try again
                await asyncio.sleep(1.0)
                continue
            if t["version"] > version:
                version = t["version"]
                table = routing_table(t)
                with self.table_cond:  # calls waiting for a table take it at once
                    self.table_info, self.latest = t, table
                    self.table_cond.notify_all()
                # the switch is a job on the engine thread, between steps (at once when idle). It is not
                # awaited here: a step waiting for this very table (a lost worker) must not hold up
                # polling for the next one. Once switched, say so at once (nothing routed): the
                # controller drops old replicas only after every gateway routes with the new version.
                job = self.engine.run_job(lambda: self._switch_table(table))
                job.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self._spawn, self._confirm_table()))

    async def _confirm_table(self) -> None:
        await self.controller.report_load(self.replica_id, torch.zeros_like(self.counts).tolist(),
                                          self.remote.table.version, self.metrics_address)

    def _switch_table(self, table: RoutingTable) -> None:
        # on the engine thread, between steps only: a step never mixes two placement versions
        if table.version > self.remote.table.version:
            self.remote.switch(table)

    # ---- health ------------------------------------------------------------------------------

    def serving(self) -> bool:
        t = self.table_info
        return (not self.closed and t["ready"] and not t["draining"] and self.engine.thread.is_alive())

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

    # ---- client RPCs -------------------------------------------------------------------------

    def check_auth(self, metadata: list[tuple[str, str]]) -> None:
        if not self.api_key:
            return
        for k, v in metadata:
            if k.lower() == "authorization" and key_matches(v, self.api_key):
                return
        raise GatewayError(grpc.StatusCode.UNAUTHENTICATED,
                           "missing or wrong API key: send metadata 'authorization: Bearer <key>'")

    def _prompt(self, request: moe_pb2.GenerateRequest) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which == "text":
            try:
                return self.tokenizer.encode(request.text)
            except ValueError as e:
                raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing: set text or token_ids")

    def _params(self, p: moe_pb2.SamplingParams) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=p.max_new_tokens or 32, temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None, stop_token_ids=tuple(p.stop_token_ids),
            stop_strings=tuple(p.stop_strings), ignore_eos=p.ignore_eos,
            logprobs=p.logprobs if p.HasField("logprobs") else None)

    def _rejected(self, e: Rejected, arrived: float, method: str) -> GatewayError:
        """Counts a refused request, and says when to retry one refused for lack of room."""
        code = STATUS_OF[e.kind]
        m = self.metrics
        m.requests.labels(method, code.name).inc()
        m.rejected.labels(e.cause).inc()
        m.rejection.observe(time.monotonic() - arrived)
        retry = None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # the time the requests waiting now take to start, at the recent rate of completions
            now = time.monotonic()
            recent = sum(1 for t in self.completions if t > now - 10.0) / 10.0
            waiting = self.scheduler.stats()["waiting"]
            retry = int(min(30_000, max(100, 1000 * (waiting + 1) / recent))) if recent else 1000
            # the trailer is gRPC's retry pushback; Serve's proxy forwards trailers only with a stream's
            # results, so the hint is in the message as well
            return GatewayError(code, f"{e} (retry in about {retry} ms)", retry)
        return GatewayError(code, str(e))

    def _request(self, request: moe_pb2.GenerateRequest) -> tuple[list[int], list[SamplingParams], str]:
        """The prompt, one SamplingParams per sample (sample i of a seeded request has seed + i), the id."""
        n = request.n or 1
        if n > MAX_CHOICES:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"n is {n}; this service allows at most {MAX_CHOICES}")
        rid = request.request_id or uuid.uuid4().hex
        if len(rid) > MAX_REQUEST_ID:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request_id has {len(rid)} characters; at most {MAX_REQUEST_ID}")
        params = self._params(request.params)
        samples = [params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**63)
                   for i in range(n)]
        return self._prompt(request), samples, rid

    def workload_index(self, name: str | None) -> int:
        """A client's x-moe-workload tag as the scheduler carries it: a listed class, else "other"."""
        names = self.cfg.workloads
        return names.index(name) if name in names else len(names)

    async def generate(self, request: moe_pb2.GenerateRequest, timeout_s: float | None = None,
                       method: str = "Generate", workload: str | None = None) -> AsyncIterator[moe_pb2.GenerateResponse]:
        """Streams the request's tokens; with n samples, theirs interleaved as they come, each message with
        its index, and each sample ending with its own finish message. `method` labels the metrics."""
        arrived = time.monotonic()
        if self.closed or self.table_info["draining"]:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the service is draining; send requests elsewhere")
        # while experts are being replaced requests are still taken: steps wait (within the expert
        # call timeout and each request's deadline) for the controller to bring them back
        prompt, samples, rid = self._request(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        m = self.metrics
        reqs = []
        try:
            for i, params in enumerate(samples):
                def emit(ev, i=i) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))

                reqs.append(self.engine.submit(prompt, params, emit, timeout_s or self.cfg.request_timeout_s,
                                               self.workload_index(workload)))
        except Rejected as e:
            for r in reqs:
                self.engine.cancel(r)
            raise self._rejected(e, arrived, method) from None
        m.prompt_tokens.inc(len(prompt))
        t_start = time.monotonic()
        last = [t_start] * len(reqs)
        code = grpc.StatusCode.CANCELLED
        running = len(reqs)
        try:
            while running:
                i, (kind, payload) = await events.get()
                now = time.monotonic()
                if kind == "token":
                    tok, piece, lp = payload
                    (m.itl.observe(now - last[i]) if last[i] != t_start else m.ttft.observe(now - t_start))
                    last[i] = now
                    m.generated_tokens.inc()
                    resp = moe_pb2.GenerateResponse(token_id=tok, text=piece, index=i, request_id=rid)
                    if lp is not None:
                        resp.logprob = lp[0]
                        resp.top_logprobs.extend(moe_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp[1])
                    yield resp
                elif kind == "finish":
                    reason, usage = payload
                    running -= 1
                    yield moe_pb2.GenerateResponse(token_id=-1, finish_reason=reason, usage=moe_pb2.Usage(**usage),
                                                   index=i, request_id=rid)
                else:
                    err_kind, message = payload
                    code = STATUS_OF.get(err_kind, grpc.StatusCode.INTERNAL)
                    raise GatewayError(code, message)
            code = grpc.StatusCode.OK
            self.completions.append(now)
            m.duration.observe(now - t_start)
        finally:
            m.requests.labels(method, code.name).inc()
            for r in reqs:
                if not r.finished:
                    self.engine.cancel(r)  # the client went away (or a sample failed): free its slot

    async def forward(self, request: moe_pb2.ForwardRequest, timeout_s: float | None = None) -> moe_pb2.ForwardResponse:
        seqs = [list(s.ids) for s in request.sequences]
        V = self.args.vocab_size
        if not seqs or any(not s for s in seqs):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "sequences must hold at least one non-empty sequence")
        total = sum(map(len, seqs))
        if total > MAX_FORWARD_TOKENS:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"sequences hold {total} tokens; Forward accepts at most {MAX_FORWARD_TOKENS}")
        for i, s in enumerate(seqs):
            try:
                check_tokens(s, V, self.args.max_position_embeddings, f"sequences[{i}]")
            except ValueError as e:
                raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        targets = [list(t.ids) for t in request.targets]
        if targets and (len(targets) != len(seqs) or any(len(t) != len(s) for t, s in zip(targets, seqs))):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "targets must match sequences one to one, same lengths")
        if targets and any(not 0 <= t < V for ts in targets for t in ts):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"targets hold a token id outside [0, {V})")
        T = max(map(len, seqs))
        dev = self.device
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=dev)
        lengths = torch.tensor([len(s) for s in seqs], device=dev)

        backend = self._backend(time.monotonic() + (timeout_s or self.cfg.request_timeout_s))

        def run() -> torch.Tensor:
            return self.model(ids, num_new=lengths, backend=backend).float()

        try:
            logits = await asyncio.wrap_future(self.engine.run_job(run))
        except StepDeadline:
            raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the experts answered") from None
        resp = moe_pb2.ForwardResponse(lengths=[len(s) for s in seqs])
        if targets:
            tgt = torch.tensor([t + [0] * (T - len(t)) for t in targets], device=dev)
            lp = logits.log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
            encode(lp, resp.target_logprobs)
        else:
            encode(logits, resp.logits)
        return resp

    def model_info(self) -> moe_pb2.ModelInfoResponse:
        s = summarize(self.args, DTYPES[self.cfg.dtype])
        c = self.scheduler.config
        keys = ("layers", "moe_layers", "hidden_size", "vocab_size", "attention_heads", "routed_experts_per_layer",
                "shared_experts_per_layer", "experts_per_token", "topk_method", "params_total",
                "params_active_per_token", "kv_cache_bytes_per_token", "dtype", "max_position_embeddings")
        return moe_pb2.ModelInfoResponse(
            name=str(s["name"]), expert_workers=len(self.table_info["addresses"]), **{k: s[k] for k in keys},
            limits=moe_pb2.ServiceLimits(
                max_prompt_tokens=c.prompt_limit, max_new_tokens=c.max_new_tokens,
                max_concurrent_requests=c.max_running, max_queued_requests=c.max_queue,
                request_timeout_s=self.cfg.request_timeout_s, kv_cache_capacity_tokens=c.capacity,
                max_forward_tokens=MAX_FORWARD_TOKENS))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = getattr(self, "loop", None)
        if loop is not None and not loop.is_closed():
            for t in self.tasks:
                loop.call_soon_threadsafe(t.cancel)
        if hasattr(self, "engine"):
            self.engine.stop()
            self.scheduler.pool.shutdown()
            self.remote.close()
