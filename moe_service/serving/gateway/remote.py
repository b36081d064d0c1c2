"""The gateway's routed experts: per MoE layer, plan the (token, expert) pairs onto workers, write each
worker its message on the calling thread's own stream, and add up the answers. The failover policy
lives here: a lost worker's pairs go to other replicas, or wait for a newer table, until the step's
deadline (docs/architecture.md)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import torch

from moe_service.model.moe import ExpertBackend
from moe_service.routing import LayerRoutes, NoReplicaError, combine, plan_dispatch
from moe_service.engine.scheduler import StepDeadline
from moe_service.transport import fastwire
from moe_service.transport.expert_client import ExpertStreams, Sent
from moe_service.transport.options import DEFAULT_MAX_MESSAGE_BYTES, TLSConfig
from moe_service.transport.staging import HostStaging

# T tokens, K experts per token, D hidden

# a worker that answers with one of these cannot serve this call: its pairs go to another replica
# (UNAVAILABLE: gone; DEADLINE_EXCEEDED: no answer within one call's timeout; FAILED_PRECONDITION: it
# no longer hosts what a stale table sent it; CANCELLED: it is shutting down)
WORKER_LOST = frozenset((grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED))


@dataclass
class RoutingTable:
    """A placement version as the gateway uses it: per-layer routes and each worker's address."""

    version: int
    routes: dict[int, LayerRoutes]  # layer -> routes
    addresses: dict[int, str]  # worker id -> host:port


@dataclass
class CallStats:
    """Per-call facts the gateway turns into metrics."""

    worker: int
    layer: int
    rows: int
    seconds: float
    compute_seconds: float
    bytes_sent: int
    bytes_received: int
    ok: bool
    retried: bool = False


class ExpertsFailed(Exception):
    """A worker answered with an error that no other replica would fix (a bug, not a loss)."""


class RemoteExperts:
    """The expert backend of a gateway. `table` is the step's table: the gateway replaces it between
    steps. `wait_for_table(excluded, version, seconds)` returns a table newer than `version` (telling
    the controller about the excluded workers), or None once the seconds pass."""

    def __init__(self, table: RoutingTable, *, call_timeout_s: float = 30.0, table_wait_s: float = 2.0,
                 wait_for_table: Callable[[set[int], int, float], RoutingTable | None] | None = None,
                 on_call: Callable[[CallStats], None] | None = None,
                 on_stage: Callable[[str, float], None] | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: TLSConfig | None = None,
                 stage_always: bool = False) -> None:
        self.table = table
        self.stage_always = stage_always  # tests: run a GPU gateway's copies on a CPU machine
        self.call_timeout_s, self.table_wait_s = call_timeout_s, table_wait_s
        self.wait_for_table = wait_for_table
        self.on_call = on_call
        # ("dispatch" | "experts" | "wire" | "combine", seconds); wire: the wait beyond the slowest
        # worker's compute and the gateway's own work meanwhile (the shared experts)
        self.on_stage = on_stage
        self.max_message_bytes, self.tls = max_message_bytes, tls
        self._local = threading.local()
        self._all: list[ExpertStreams] = []
        self._lock = threading.Lock()

    def streams(self) -> ExpertStreams:
        """The calling thread's streams (made at its first call)."""
        s = getattr(self._local, "streams", None)
        if s is None:
            s = self._local.streams = ExpertStreams(self.max_message_bytes, self.tls)
            self._local.staging = HostStaging(self.stage_always)
            with self._lock:
                self._all.append(s)
        return s

    def staging(self) -> HostStaging:
        """The calling thread's host buffers for a device's tensors (made with its streams)."""
        self.streams()
        return self._local.staging

    def backend(self, deadline: float | None) -> ExpertBackend:
        """The backend of one micro-batch whose requests' latest deadline is `deadline`: it sends a
        layer's dispatch and answers with a function that waits for (and combines) the answers, so the
        model runs the shared experts meanwhile."""
        return lambda layer, x, weights, experts: LayerCall(self, layer, x, weights, experts, deadline)

    def run(self, layer: int, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
            deadline: float | None = None) -> torch.Tensor:
        """x [T, D], weights [T, K], experts [T, K] -> [T, D]"""
        return LayerCall(self, layer, x, weights, experts, deadline).finish()

    def switch(self, table: RoutingTable) -> None:
        """Route later calls with `table`, and close every thread's streams to workers it no longer
        lists. Between steps only (the gateway's engine thread, while no other thread sends)."""
        self.table = table
        addresses = set(table.addresses.values())
        with self._lock:
            streams = list(self._all)
        for s in streams:
            s.keep_only(addresses)

    def open_addresses(self) -> set[str]:
        """Every address some thread holds a stream to (tests check that dropped workers' close)."""
        with self._lock:
            return set().union(*(s.addresses for s in self._all))

    def close(self) -> None:
        """Closes every thread's streams; call when no step runs. A thread of its own does it: the
        caller may be running an event loop already."""
        with self._lock:
            streams, self._all = self._all, []
        closer = threading.Thread(target=lambda: [s.close() for s in streams], name="close-expert-streams")
        closer.start()
        closer.join(10)


class LayerCall:
    """One MoE layer's routed experts for one micro-batch: sent on construction, answered when called.

    Its tensors come to the host first (`HostStaging`: nothing to do on a CPU gateway, two copies on
    a GPU one); `x`, `weights` and `experts` are those host tensors, and the answer goes back to the
    gateway's device."""

    def __init__(self, remote: RemoteExperts, layer: int, x: torch.Tensor, weights: torch.Tensor,
                 experts: torch.Tensor, deadline: float | None) -> None:
        self.remote, self.layer, self.device = remote, layer, x.device
        self.deadline = deadline if deadline is not None else float("inf")
        self.table = remote.table
        self.streams, self.staging = remote.streams(), remote.staging()
        # timed as dispatch: on a GPU gateway the copies wait for the layer's attention and gate to finish
        self.t_staging = time.perf_counter()
        self.x, self.weights, self.experts = self.staging.to_host(x, weights, experts)
        # [T, K] on the host: the pairs still owed an answer, -1 elsewhere. Never the caller's `experts`,
        # which on a GPU gateway live on the device the host-side plan cannot index.
        self.pending = self.experts
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.excluded: set[int] = set()
        self.retried = False
        self._send()

    def _send(self) -> None:
        """Plans the pending pairs (waiting for a newer table while a pair has no live replica) and
        writes each worker its message."""
        r = self.remote
        t0, self.t_staging = self.t_staging, time.perf_counter()  # the first send counts the staging too
        while True:
            if time.monotonic() >= self.deadline:
                raise StepDeadline(f"layer {self.layer}: the step's deadline passed before the experts answered")
            try:
                self.plan = plan_dispatch(self.pending, self.weights, self.table.routes[self.layer].without(self.excluded))
                break
            except NoReplicaError:
                self.table = self._newer_table()
                self.excluded = set()
        self.call_deadline = min(self.deadline, time.monotonic() + r.call_timeout_s)
        left = self.deadline - time.monotonic() if self.deadline != float("inf") else 0.0
        messages = []
        for d in self.plan:
            seq = self.streams.next_seq()
            payload = fastwire.encode_request(self.layer, self.x, d.experts, d.weights, d.rows, seq, left)
            messages.append((self.table.addresses[d.worker], payload, seq,
                             (self.x.dtype, (d.rows.shape[0], self.x.shape[1]))))
        self.sizes = [len(m[1]) for m in messages]
        self.sent: list[Sent] = self.streams.send(messages, self.call_deadline)
        self.t_sent = time.perf_counter()
        if r.on_stage is not None:
            r.on_stage("dispatch", self.t_sent - t0)

    def _newer_table(self) -> RoutingTable:
        """A newer table for this call (the gateway's own switches between steps), or the same one once
        a wait runs out: an excluded worker may have been a passing failure."""
        r = self.remote
        wait = max(0.0, min(r.table_wait_s, self.deadline - time.monotonic()))
        if r.wait_for_table is None:  # nobody to ask: back off, then try the same table again
            time.sleep(wait)
            return self.table
        newer = r.wait_for_table(self.excluded, self.table.version, wait)
        return newer if newer is not None and newer.version > self.table.version else self.table

    def __call__(self) -> torch.Tensor:
        return self.finish()

    def finish(self) -> torch.Tensor:
        """-> [T, D] on the gateway's device: the weighted sum of every pair's expert, whichever
        workers answered."""
        r = self.remote
        while True:
            t_wait = time.perf_counter()
            answers = self.streams.receive(self.sent, self.call_deadline)
            t_done = time.perf_counter()
            lost = torch.zeros(self.experts.shape, dtype=torch.bool)
            slowest = 0.0
            for d, a, s, size in zip(self.plan, answers, self.sent, self.sizes):
                ok = isinstance(a, fastwire.Response)
                if ok:
                    self.parts.append((d.rows, a.output))
                    slowest = max(slowest, a.compute_seconds)
                elif a.code in WORKER_LOST:
                    self.excluded.add(d.worker)
                    lost[d.rows] |= d.experts >= 0
                else:
                    raise ExpertsFailed(f"worker {d.worker}, layer {self.layer}: {a}")
                if r.on_call is not None:
                    r.on_call(CallStats(d.worker, self.layer, int(d.rows.numel()), s.answered - self.t_sent,
                                        a.compute_seconds if ok else 0.0, size,
                                        a.output.nbytes if ok else 0, ok, self.retried))
            if r.on_stage is not None:
                r.on_stage("experts", t_done - self.t_sent)
                # beyond both the slowest worker's compute and what the gateway did meanwhile
                r.on_stage("wire", max(0.0, t_done - self.t_sent - max(slowest, t_wait - self.t_sent)))
            if not bool(lost.any()):
                out = combine(self.x.shape[0], self.parts, self.x, self.staging.answer_buffer(self.x, self.device))
                out = self.staging.to_device(out, self.device)
                if r.on_stage is not None:
                    r.on_stage("combine", time.perf_counter() - t_done)
                return out
            # only the lost workers' pairs are planned again; padding stays padding
            self.pending = torch.where(lost, self.experts, -1)
            self.retried = True
            self._send()

