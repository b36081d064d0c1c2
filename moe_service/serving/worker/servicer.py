"""What an expert worker answers: moe.v1.Expert's RunExperts (unary, and on the gateways' streams) over
the (layer, expert) replicas it hosts, and Describe."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import grpc
import torch

from moe_service.checkpoint.loader import join_experts
from moe_service.model.args import DTYPES
from moe_service.model.experts import RoutedExperts, group_pairs
from moe_service.model.fp8 import FP8Experts
from moe_service.transport import fastwire
from moe_service.transport.options import DEFAULT_MAX_MESSAGE_BYTES
from moe_service.transport.pb import moe_pb2, moe_pb2_grpc

# N rows, K experts per row, D hidden
FLOAT_NAMES = tuple(DTYPES)
INLINE_ROWS = 8  # up to this many rows compute on the stream's own thread: a thread hop would cost more


@dataclass
class HostedLayer:
    """One layer's experts on this worker: the module and which expert each local index holds, and with
    `standby: host` the standbys parked in host memory, whose local indices follow the module's: the first
    call that needs one joins them all to the module (`promote`), on the module's device."""

    experts: "RoutedExperts | FP8Experts"
    expert_ids: list[int]
    # [E + 2]: index e < E: e's local index, or -2 (not hosted); index E: -2 (an id out of range, clamped
    # here); index E + 1, reached as -1: -1 (no expert in this column)
    local_of: torch.Tensor
    parked: "RoutedExperts | FP8Experts | None" = None
    parked_ids: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, experts: "RoutedExperts | FP8Experts", expert_ids: list[int], num_experts: int,
              parked: "RoutedExperts | FP8Experts | None" = None, parked_ids: list[int] = ()) -> "HostedLayer":
        local_of = torch.full((num_experts + 2,), -2, dtype=torch.long)
        local_of[-1] = -1
        ids = list(expert_ids) + list(parked_ids)
        local_of[torch.tensor(ids, dtype=torch.long)] = torch.arange(len(ids))
        return cls(experts, list(expert_ids), local_of, parked if parked_ids else None, list(parked_ids))

    def promote(self, local: torch.Tensor) -> float | None:
        """Joins the parked standbys to the module if `local` uses one; returns the seconds it took (None: no
        promotion). A call already running keeps the module it started with: its indices are all below."""
        if self.parked is None or int(local.max()) < self.experts.num_local:
            return None
        with self.lock:
            if self.parked is None:  # another call promoted them meanwhile
                return None
            t0 = time.perf_counter()
            joined = join_experts(self.experts, self.parked)
            if joined.device.type == "cuda":
                torch.cuda.synchronize(joined.device)
            self.experts, self.expert_ids = joined, self.expert_ids + self.parked_ids
            self.parked, self.parked_ids = None, []
            return time.perf_counter() - t0


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _check_finite(t: torch.Tensor, name: str) -> None:
    """The one NaN/Inf check: a sum is non-finite whenever an element is (and costs a tenth of isfinite());
    only when it is (NaN/Inf, or an overflow of huge finite values) decide element by element."""
    if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"{name} contains NaN or Inf")


class ExpertServicer(moe_pb2_grpc.ExpertServicer):
    """`hosted` may be swapped whole (`set_hosted`) while serving: a call uses the dict it started with."""

    def __init__(self, hosted: dict[int, HostedLayer], *, worker_id: str, hidden_size: int, num_experts: int,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 on_call: Callable[[int, int, int, float], None] | None = None,
                 on_promote: Callable[[int, float], None] | None = None) -> None:
        self.hosted = hosted
        self.on_promote = on_promote  # (layer, seconds): parked standbys joined the layer's module
        self.worker_id, self.hidden_size, self.num_experts = worker_id, hidden_size, num_experts
        self.max_message_bytes = max_message_bytes
        self.on_call = on_call  # (layer, rows, bytes in, compute seconds) for metrics
        # one compute thread: experts are matmul-bound and torch already uses every core per op
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts")

    def set_hosted(self, hosted: dict[int, HostedLayer]) -> None:
        self.hosted = hosted

    def _parse(self, request: fastwire.Request, hosted: dict[int, HostedLayer]
               ) -> tuple[HostedLayer, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (layer, hidden [N, D], local [N, K] (local index or -1), weights [N, K])"""
        inv = grpc.StatusCode.INVALID_ARGUMENT
        if request.error is not None:
            raise BadRequest(inv, request.error)
        if request.layer not in hosted:
            # FAILED_PRECONDITION, not INVALID_ARGUMENT: a placement that moved on, the caller's table is stale
            raise BadRequest(grpc.StatusCode.FAILED_PRECONDITION, f"layer {request.layer} is not hosted by worker "
                                                                  f"{self.worker_id}; hosted layers: {sorted(hosted)}")
        layer = hosted[request.layer]
        x, ids, weights = request.hidden, request.experts, request.weights  # codec.Raw: checked bytes
        if len(x.shape) != 2 or x.shape[1] != self.hidden_size:
            raise BadRequest(inv, f"hidden has shape {x.shape}; expected [rows, {self.hidden_size}]")
        if x.dtype not in FLOAT_NAMES:
            raise BadRequest(inv, f"hidden has dtype {x.dtype}; expected float32, bfloat16 or float16")
        rows = x.shape[0]
        if rows == 0:
            raise BadRequest(inv, "hidden is empty: a dispatch needs at least one row")
        if ids.dtype not in ("int32", "int64"):
            raise BadRequest(inv, f"experts has dtype {ids.dtype}; expected int32 or int64")
        if weights.dtype != "float32":
            raise BadRequest(inv, f"weights has dtype {weights.dtype}; expected float32")
        if len(ids.shape) != 2 or ids.shape[0] != rows or ids.shape[1] < 1:
            raise BadRequest(inv, f"experts has shape {ids.shape}; expected [{rows}, K>=1]")
        if weights.shape != ids.shape:
            raise BadRequest(inv, f"weights has shape {weights.shape}; expected {ids.shape}")
        xt, wt = x.tensor(), weights.tensor()
        local = self._local(request.layer, layer, ids.tensor())
        _check_finite(xt, "hidden")
        _check_finite(wt, "weights")
        return layer, xt, local, wt

    def _local(self, layer_id: int, layer: HostedLayer, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, K] (int32 as sent) -> local indices [N, K], -1 where a column is empty."""
        # ids below -1 and from num_experts up are clamped onto the table's "bad" entry, -2
        local = layer.local_of[ids.clamp(-2, self.num_experts)]
        if int(local.min()) < -1:  # out of range, or an expert this worker does not host
            bad = int(ids[local < -1][0])
            if bad < -1 or bad >= self.num_experts:
                raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"experts has id {bad}; ids are in [0, {self.num_experts}) or -1 for none")
            raise BadRequest(grpc.StatusCode.FAILED_PRECONDITION,
                             f"experts has expert {bad} of layer {layer_id}, which worker {self.worker_id} "
                             f"does not host (hosted: {layer.expert_ids + layer.parked_ids})")
        return local

    def _compute(self, layer_id: int, layer: HostedLayer, x: torch.Tensor, local: torch.Tensor,
                 weights: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """-> (output [N, D] in x's dtype, written into `out` if given; seconds)"""
        t0 = time.perf_counter()
        promoted = layer.promote(local)  # the pairs of a lost replica reached a parked standby here
        if promoted is not None and self.on_promote is not None:
            self.on_promote(layer_id, promoted)
        # the layer's own device and dtype: a worker started with no experts learns them from what it
        # is given to host (the controller's recovery path), and layers may differ
        ex = layer.experts
        # grouped here, where the request arrived: on a GPU worker nothing then waits on the device
        # before the experts run
        grouping = group_pairs(weights, local, ex.num_local).to(ex.device)
        y = ex.run(x.to(ex.device, ex.dtype), grouping)
        y = out.copy_(y) if out is not None else y.to("cpu", x.dtype)
        return y, time.perf_counter() - t0

    async def _answer(self, request: fastwire.Request, deadline: float | None) -> bytes:
        """The response's bytes; BadRequest for a request that cannot be served (bad input, a stale
        placement, or `deadline`, a time.monotonic() value, already passed)."""
        layer, x, local, weights = self._parse(request, self.hosted)
        # gRPC's own deadline timer is coarse: a call already late would still be served now and then
        if deadline is not None and time.monotonic() >= deadline:
            raise BadRequest(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the experts ran")
        # a large output is written straight into the response's bytes
        buf = fastwire.ResponseBuffer(x.shape, x.dtype, request.seq) if fastwire.in_place(x.nbytes) else None
        out = buf.output if buf is not None else None
        if x.shape[0] <= INLINE_ROWS:
            y, seconds = self._compute(request.layer, layer, x, local, weights, out)
        else:
            y, seconds = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._compute, request.layer, layer, x, local, weights, out)
        if self.on_call is not None:
            self.on_call(request.layer, x.shape[0], request.nbytes, seconds)
        return buf.finish(seconds) if buf is not None else fastwire.encode_response(y, seconds, request.seq)

    async def RunExperts(self, request: fastwire.Request, context) -> bytes:
        remaining = context.time_remaining()
        try:
            return await self._answer(request, None if remaining is None else time.monotonic() + remaining)
        except BadRequest as e:
            await context.abort(e.code, str(e))

    async def RunExpertsStream(self, requests, context):
        """Answers each request in turn on this stream, small ones on this loop's thread; a request
        that fails is answered with its error, and the stream stays open."""
        async for request in requests:
            deadline = time.monotonic() + request.deadline_s if request.deadline_s else None
            try:
                yield await self._answer(request, deadline)
            except BadRequest as e:
                yield fastwire.encode_error(request.seq, e.code.value[0], str(e))
            except Exception as e:  # a bug here, not a lost worker: say so, and keep the stream for the next
                yield fastwire.encode_error(request.seq, grpc.StatusCode.INTERNAL.value[0], f"the experts failed: {e!r}")

    async def Describe(self, request, context):
        layers = sorted(self.hosted.items())
        hosted = [moe_pb2.HostedExpert(layer=l, expert=e) for l, h in layers for e in h.expert_ids + h.parked_ids]
        ex = layers[0][1].experts if layers else None
        return moe_pb2.DescribeResponse(
            worker_id=self.worker_id, hosted=hosted, device=str(ex.device) if ex is not None else "",
            dtype=str(ex.dtype).removeprefix("torch.") if ex is not None else "", max_message_bytes=self.max_message_bytes)
