"""The gateway's client of the remote experts.

`RemoteExperts` holds what all of a gateway's model threads share: the step's routing table and the
failover settings. Each model thread owns a `Dispatcher`: its streams to the workers, its staging
buffers and the micro-batch it is in. A MoE layer calls `dispatcher.send(layer, hidden, weights, ids)`:
the pairs are planned onto workers and each worker's message is written on the thread's own stream; the
model runs its shared experts meanwhile, then `pending.wait()` reads the answers and adds them up. The
failover policy lives behind `wait()`: a lost worker's pairs go to other replicas, or wait for a newer
table, until the micro-batch's deadline (docs/architecture.md).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import torch

from moe_service.engine.clock import StepClock
from moe_service.engine.runner import StepDeadline
from moe_service.routing import LayerRoutes, NoReplicaError, WorkerDispatch, combine, plan_dispatch
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


@dataclass(slots=True)
class CallStats:
    """One worker's part of one layer call, for the gateway's per-worker metrics."""

    worker: int
    rows: int
    seconds: float
    compute_seconds: float
    bytes_sent: int
    bytes_received: int
    ok: bool
    retried: bool


@dataclass
class StepRecord:
    """What one micro-batch's layer calls did, for the step's observers: the ids each MoE layer's gate
    chose (routing counts are taken from these once per step) and every worker call."""

    workloads: torch.Tensor | None = None  # [T] each FFN row's workload class, when counted
    routed: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, ids [T, K] on the host)
    calls: list[CallStats] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)  # per layer call that lost a worker: loss to answer, seconds


class ExpertsFailed(Exception):
    """A worker answered with an error that no other replica would fix (a bug, not a loss)."""


class RemoteExperts:
    """`table` routes the current step: the gateway replaces it between steps (`switch`).
    `wait_for_table(excluded, version, seconds)` returns a table newer than `version` (telling the
    controller about the excluded workers), or None once the seconds pass. `overlap`: the model's shared
    experts run while the routed ones are on the wire (off, each layer call is waited for at once)."""

    def __init__(self, table: RoutingTable, *, call_timeout_s: float = 30.0, message_timeout_s: float = 2.0,
                 row_timeout_s: float = 0.01, table_wait_s: float = 2.0,
                 wait_for_table: Callable[[set[int], int, float], RoutingTable | None] | None = None,
                 overlap: bool = True, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: TLSConfig | None = None, stage_always: bool = False) -> None:
        self.table = table
        self.call_timeout_s, self.table_wait_s = call_timeout_s, table_wait_s
        # a message's answer is due `message_timeout_s` + `row_timeout_s` per row after it is sent (at most
        # `call_timeout_s`): a hung worker is found in about a step's time, not the call timeout's
        self.message_timeout_s, self.row_timeout_s = message_timeout_s, row_timeout_s
        self.wait_for_table, self.overlap = wait_for_table, overlap
        self.max_message_bytes, self.tls = max_message_bytes, tls
        self.stage_always = stage_always  # tests: run a GPU gateway's copies on a CPU machine
        self._dispatchers: list[Dispatcher] = []
        self._lock = threading.Lock()
        # workers a model thread found lost (a broken stream, no answer in time): every thread plans
        # without them at once, until the next table (the controller's word on them)
        self.down: frozenset[int] = frozenset()

    def mark_down(self, worker: int) -> None:
        with self._lock:
            self.down = self.down | {worker}

    def down_in(self, table: RoutingTable) -> frozenset[int]:
        """The marks, for a call planned with `table`: they were made against the gateway's table, and a
        newer one (a call's own, from the controller) already says where each worker is."""
        return self.down if table.version <= self.table.version else frozenset()

    def forget_down(self, version: int) -> None:
        """A wait for a table newer than `version` ran out: what was marked down may have been a passing
        failure, so try every worker again (a later table clears the marks anyway)."""
        with self._lock:
            if self.table.version <= version:
                self.down = frozenset()

    def dispatcher(self) -> "Dispatcher":
        """A new dispatcher, for one model thread (or one tool's calls)."""
        d = Dispatcher(self)
        with self._lock:
            self._dispatchers.append(d)
        return d

    def switch(self, table: RoutingTable) -> None:
        """Route later micro-batches with `table`, and close every dispatcher's streams to workers it no
        longer lists. Between steps only (while no model thread sends)."""
        self.table = table
        addresses = set(table.addresses.values())
        with self._lock:
            self.down = frozenset()
            dispatchers = list(self._dispatchers)
        for d in dispatchers:
            d.streams.keep_only(addresses)

    def open_addresses(self) -> set[str]:
        """Every address some dispatcher holds a stream to (tests check that dropped workers' close)."""
        with self._lock:
            return set().union(*(d.streams.addresses for d in self._dispatchers))

    def close(self) -> None:
        """Closes every dispatcher's streams; call when no step runs. A thread of its own does it: the
        caller may be running an event loop already."""
        with self._lock:
            dispatchers, self._dispatchers = self._dispatchers, []
        closer = threading.Thread(target=lambda: [d.streams.close() for d in dispatchers], name="close-expert-streams")
        closer.start()
        closer.join(10)


class Dispatcher:
    """One model thread's side of the wire. `begin` starts a micro-batch (its table, deadline and clock),
    `send` makes its layer calls, `end` hands over what they recorded."""

    def __init__(self, remote: RemoteExperts) -> None:
        self.remote = remote
        self.streams = ExpertStreams(remote.max_message_bytes, remote.tls)
        self.staging = HostStaging(remote.stage_always)
        self.table = remote.table
        self.deadline = float("inf")
        self.clock: StepClock | None = None  # set by begin()
        self.record = StepRecord()

    def begin(self, deadline: float | None, clock: StepClock, workloads: torch.Tensor | None = None) -> None:
        # a step's table is the one in force when it starts: a switch lands between steps
        self.table = self.remote.table
        self.deadline = deadline if deadline is not None else float("inf")
        self.clock, self.record = clock, StepRecord(workloads)

    def end(self) -> StepRecord:
        return self.record

    def send(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> "LayerCall":
        """hidden [T, D], weights [T, K], ids [T, K] on the gateway's device: the call in flight."""
        t0 = time.perf_counter()
        # timed as dispatch: on a GPU gateway the copies wait for the layer's attention and gate to finish
        x, w, ids_h = self.staging.to_host(hidden, weights, ids)
        self.record.routed.append((layer, ids_h))
        call = LayerCall(self, layer, hidden.device, x, w, ids_h)
        call.send(ids_h)
        self.clock.add_seconds("dispatch", time.perf_counter() - t0)
        if not self.remote.overlap:
            call.wait()
        return call

    def run(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
            deadline: float | None = None) -> torch.Tensor:
        """One layer call outside any step (tools, tests, gpu_check): x [T, D] -> [T, D]."""
        self.begin(deadline, StepClock(hidden.device))
        return self.send(layer, hidden, weights, ids).wait()


class LayerCall:
    """One MoE layer's routed experts for one micro-batch, in flight: `x`, `weights` and `ids` are the
    host tensors the plan was made from; the answer goes back to `device`."""

    def __init__(self, d: Dispatcher, layer: int, device: torch.device, x: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> None:
        self.d, self.layer, self.device = d, layer, device
        self.x, self.weights, self.ids = x, weights, ids
        self.table = d.table
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.excluded: set[int] = set()
        self.retried = False
        self.lost_at: float | None = None  # time.perf_counter() when it first found a worker lost
        self.result: torch.Tensor | None = None

    def send(self, pending: torch.Tensor) -> None:
        """Plans the `pending` pairs ([T, K], -1 where none), waiting for a newer table while one has no live
        replica, and writes each worker its message."""
        d, r = self.d, self.d.remote
        missing: NoReplicaError | None = None
        while True:
            if time.monotonic() >= d.deadline:
                why = f" ({missing}: every worker hosting it was lost)" if missing else ""
                raise StepDeadline(f"layer {self.layer}: the step's deadline passed before the experts answered{why}")
            try:
                self.plan = plan_dispatch(pending, self.weights,
                                          self.table.routes[self.layer].without(self.excluded | r.down_in(self.table)))
                break
            except NoReplicaError as e:
                missing = e
                self.table = self._newer_table(e)
                self.excluded = set()
        now = time.monotonic()
        due = [min(d.deadline, now + min(r.call_timeout_s, r.message_timeout_s + r.row_timeout_s * p.rows.shape[0]))
               for p in self.plan]
        left = d.deadline - now if d.deadline != float("inf") else 0.0
        messages = []
        for p in self.plan:
            seq = d.streams.next_seq()
            payload = fastwire.encode_request(self.layer, self.x, p.experts, p.weights, p.rows, seq, left)
            messages.append((self.table.addresses[p.worker], payload, seq, (self.x.dtype, (p.rows.shape[0], self.x.shape[1]))))
        self.sizes = [len(m[1]) for m in messages]
        self.sent: list[Sent] = d.streams.send(messages, due)
        self.t_sent = time.perf_counter()

    def _newer_table(self, e: NoReplicaError) -> RoutingTable:
        """A newer table for this call (the gateway's own switches between steps), or the same one once a
        wait runs out: an excluded worker may have been a passing failure."""
        d, r = self.d, self.d.remote
        wait = max(0.0, min(r.table_wait_s, d.deadline - time.monotonic()))
        if r.wait_for_table is None:  # nobody to ask: back off, then try the same table again
            time.sleep(wait)
            r.forget_down(self.table.version)
            return self.table
        newer = r.wait_for_table(self.excluded | r.down_in(self.table), self.table.version, wait)
        if newer is not None and newer.version > self.table.version:
            return newer
        r.forget_down(self.table.version)
        return self.table

    def wait(self) -> torch.Tensor:
        """-> [T, D] on the gateway's device: the weighted sum of every pair's expert, whichever workers
        answered."""
        if self.result is not None:
            return self.result
        d = self.d
        while True:
            t_wait = time.perf_counter()
            answers = d.streams.receive(self.sent)
            t_done = time.perf_counter()
            lost: torch.Tensor | None = None
            slowest = 0.0
            for p, a, s, size in zip(self.plan, answers, self.sent, self.sizes):
                ok = isinstance(a, fastwire.Response)
                if ok:
                    self.parts.append((p.rows, a.output))
                    slowest = max(slowest, a.compute_seconds)
                elif a.code in WORKER_LOST:
                    self.excluded.add(p.worker)
                    if a.code != grpc.StatusCode.FAILED_PRECONDITION:  # that one is alive, with a newer table
                        d.remote.mark_down(p.worker)
                    lost = self._lose(lost, p)
                else:
                    raise ExpertsFailed(f"worker {p.worker}, layer {self.layer}: {a}")
                d.record.calls.append(CallStats(p.worker, p.rows.shape[0], s.answered - self.t_sent,
                                                a.compute_seconds if ok else 0.0, size,
                                                a.output.nbytes if ok else 0, ok, self.retried))
            d.clock.add_seconds("experts", t_done - self.t_sent)
            # beyond both the slowest worker's compute and what the gateway did meanwhile
            d.clock.add_seconds("wire", max(0.0, t_done - self.t_sent - max(slowest, t_wait - self.t_sent)))
            if lost is None:
                out = combine(self.x.shape[0], self.parts, self.x, d.staging.answer_buffer(self.x, self.device))
                self.result = d.staging.to_device(out, self.device)
                d.clock.add_seconds("combine", time.perf_counter() - t_done)
                if self.lost_at is not None:
                    d.record.stalls.append(time.perf_counter() - self.lost_at)
                return self.result
            # only the lost workers' pairs are planned again; padding stays padding
            self.retried = True
            if self.lost_at is None:
                self.lost_at = t_done
            self.send(torch.where(lost, self.ids, -1))

    def _lose(self, lost: torch.Tensor | None, p: WorkerDispatch) -> torch.Tensor:
        """The pairs still owed an answer, [T, K] bool, once worker p.worker's are added."""
        if lost is None:
            lost = torch.zeros(self.ids.shape, dtype=torch.bool)
        lost[p.rows] |= p.experts >= 0
        return lost
