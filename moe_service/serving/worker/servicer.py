"""The expert worker's gRPC server (grpc.aio): runs hosted experts batched, with health and reflection."""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import grpc
import torch

from moe_service.model.args import DTYPES
from moe_service.model.experts import RoutedExperts, group_pairs
from moe_service.transport import fastwire
from moe_service.transport.codec import Raw
from moe_service.transport.options import DEFAULT_MAX_MESSAGE_BYTES, TLSConfig, grpc_options
from moe_service.transport.pb import moe_pb2, moe_pb2_grpc

FLOAT_NAMES = tuple(DTYPES)
EXPERT_SERVICE = "moe.v1.Expert"
INLINE_ROWS = 8
SMALL_PAIRS = 64  # (row, expert) pairs up to which ids are checked as Python lists (see fastwire on why)


@dataclass
class HostedLayer:
    """One layer's experts on this worker: the module and which expert each local index holds."""

    experts: RoutedExperts
    expert_ids: list[int]
    local_of: torch.Tensor  # [E_layer + 2] local index of each expert id, -2 if not hosted (see build)
    local_list: list[int]  # the same as a list

    @classmethod
    def build(cls, experts: RoutedExperts, expert_ids: list[int], num_experts: int) -> "HostedLayer":
        # index e < num_experts: e's local index or -2 (not hosted); num_experts: -2 (an id out of
        # range, clamped here); num_experts + 1, reached as -1: -1 (no expert in this column)
        local_of = torch.full((num_experts + 2,), -2, dtype=torch.long)
        local_of[-1] = -1
        local_of[torch.tensor(expert_ids, dtype=torch.long)] = torch.arange(len(expert_ids))
        return cls(experts, list(expert_ids), local_of, local_of.tolist())


# the byte of each element that holds the sign and the exponent's top bits, and the mask that
# keeps those exponent bits; all of them set is the only way to spell NaN or Inf
_HIGH_BYTE = {"bfloat16": (1, 2, 0x7F), "float32": (3, 4, 0x7F), "float16": (1, 2, 0x7C)}
_MASKS = {mask: bytes(b & mask for b in range(256)) for mask in (0x7F, 0x7C)}


def _finite_by_bytes(x: Raw) -> bool:
    """False if some element may be NaN or Inf, judged from its high byte alone (C-speed bytes
    operations, no tensor op). Exact for float16; for bfloat16 and float32 it also flags finite
    values of magnitude 2^127 and above, which the caller then checks element-wise."""
    offset, step, mask = _HIGH_BYTE[x.dtype]
    high = bytes(x.data)[offset::step].translate(_MASKS[mask])
    return bytes([mask]) not in high


def _all_finite(t: torch.Tensor) -> bool:
    # A sum is non-finite whenever an element is, and is ~10x cheaper than isfinite() on a big
    # tensor; only when it is (NaN/Inf, or an overflow of huge finite values) decide element-wise.
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _sum_is_finite(x: torch.Tensor) -> bool:
    # one reduction in x's own dtype (an fp32 accumulation of bf16 costs 8x more)
    return math.isfinite(float(x.sum()))


def _check_hidden(x: torch.Tensor, ok: bool) -> None:
    """Not ok is not yet bad: a sum overflows, and a byte pattern only flags candidates; the
    element-wise check decides."""
    if not ok and not _all_finite(x):
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "hidden contains NaN or Inf")


class ExpertServicer(moe_pb2_grpc.ExpertServicer):
    """`hosted` may be swapped whole (`set_hosted`) while serving: a call uses the dict it started with."""

    def __init__(
        self, hosted: dict[int, HostedLayer], *, worker_id: str, hidden_size: int, num_experts: int,
        replicas_per_layer: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_call: Callable[[int, int, int, float], None] | None = None,
        hold: Callable[[torch.Tensor], float] | None = None,
    ) -> None:
        self.hosted = hosted
        self.worker_id, self.hidden_size, self.num_experts = worker_id, hidden_size, num_experts
        self.replicas_per_layer, self.max_message_bytes = replicas_per_layer, max_message_bytes
        self.on_call = on_call  # (layer, rows, bytes in, compute seconds) for metrics
        self.hold = hold  # a simulated device: local ids -> the seconds an answer takes at least
        # one compute thread: experts are matmul-bound and torch already uses every core per op
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts")

    def set_hosted(self, hosted: dict[int, HostedLayer]) -> None:
        self.hosted = hosted

    def _parse(self, request: fastwire.Request, hosted: dict[int, HostedLayer]
               ) -> tuple[HostedLayer, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """-> (layer, hidden [N, D], local [N, K] (local index or -1), weights [N, K], whether hidden
        is still to be checked for NaN/Inf: a large one is, by RunExperts, while the experts run)"""
        inv = grpc.StatusCode.INVALID_ARGUMENT
        if request.error is not None:
            raise BadRequest(inv, request.error)
        if request.layer not in hosted:
            # FAILED_PRECONDITION, not INVALID_ARGUMENT: a placement that moved on, the caller's table is stale
            raise BadRequest(grpc.StatusCode.FAILED_PRECONDITION, f"layer {request.layer} is not hosted by worker "
                                                                  f"{self.worker_id}; hosted layers: {sorted(hosted)}")
        layer = hosted[request.layer]
        x, experts, weights = request.hidden, request.experts, request.weights  # codec.Raw: checked bytes
        if len(x.shape) != 2 or x.shape[1] != self.hidden_size:
            raise BadRequest(inv, f"hidden has shape {x.shape}; expected [rows, {self.hidden_size}]")
        if x.dtype not in FLOAT_NAMES:
            raise BadRequest(inv, f"hidden has dtype {x.dtype}; expected float32, bfloat16 or float16")
        rows = x.shape[0]
        if rows == 0:
            raise BadRequest(inv, "hidden is empty: a dispatch needs at least one row")
        if experts.dtype not in ("int32", "int64"):
            raise BadRequest(inv, f"experts has dtype {experts.dtype}; expected int32 or int64")
        if weights.dtype != "float32":
            raise BadRequest(inv, f"weights has dtype {weights.dtype}; expected float32")
        if len(experts.shape) != 2 or experts.shape[0] != rows or experts.shape[1] < 1:
            raise BadRequest(inv, f"experts has shape {experts.shape}; expected [{rows}, K>=1]")
        if weights.shape != experts.shape:
            raise BadRequest(inv, f"weights has shape {weights.shape}; expected {experts.shape}")
        xt, wt = x.tensor(), weights.tensor()
        if experts.numel <= SMALL_PAIRS:
            # a decode step: ids and weights checked in plain Python, no tensor op
            local = self._small_local(request.layer, layer, experts.values(), experts.shape)
            weights_ok = math.isfinite(sum(weights.values()))
        else:
            local = self._local_ids(request.layer, layer, experts.tensor())
            weights_ok = math.isfinite(float(wt.sum()))
        small = len(x.data) < fastwire.SMALL_MESSAGE
        if small:
            _check_hidden(xt, _finite_by_bytes(x))
        if not weights_ok and not _all_finite(wt):
            raise BadRequest(inv, "weights contains NaN or Inf")
        return layer, xt, local, wt, not small

    def _bad_id(self, layer_id: int, layer: HostedLayer, bad: int) -> BadRequest:
        if bad < -1 or bad >= self.num_experts:
            return BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                              f"experts has id {bad}; ids are in [0, {self.num_experts}) or -1 for none")
        return BadRequest(grpc.StatusCode.FAILED_PRECONDITION,
                          f"experts has expert {bad} of layer {layer_id}, which worker {self.worker_id} "
                          f"does not host (hosted: {layer.expert_ids})")

    def _small_local(self, layer_id: int, layer: HostedLayer, ids: list[int], shape: list[int]) -> torch.Tensor:
        table, n = layer.local_list, self.num_experts
        local = array("q", [table[e] if -1 <= e < n else -2 for e in ids])
        if min(local) < -1:  # out of range, or an expert this worker does not host
            raise self._bad_id(layer_id, layer, next(e for e, s in zip(ids, local) if s < -1))
        return torch.frombuffer(local, dtype=torch.int64).view(shape)

    def _local_ids(self, layer_id: int, layer: HostedLayer, e: torch.Tensor) -> torch.Tensor:
        # ids below -1 and from num_experts up are clamped onto the table's "bad" entry, -2
        local = layer.local_of[e.clamp(-2, self.num_experts)]
        if int(local.min()) < -1:  # out of range, or an expert this worker does not host
            raise self._bad_id(layer_id, layer, int(e[local < -1][0]))
        return local

    def _compute(self, layer: HostedLayer, x: torch.Tensor, local: torch.Tensor, weights: torch.Tensor,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """-> (output [N, D] in x's dtype, written into `out` if given; seconds)"""
        t0 = time.perf_counter()
        # the layer's own device and dtype: a worker started with no experts learns them from what it
        # is given to host (the controller's recovery path), and layers may differ
        w = layer.experts.gate_up_proj
        # grouped here, where the request arrived: on a GPU worker nothing then waits on the device
        # before the experts run
        grouping = group_pairs(weights, local, layer.experts.num_local).to(w.device)
        y = layer.experts.run(x.to(w.device, w.dtype), grouping)
        y = out.copy_(y) if out is not None else y.to("cpu", x.dtype)
        return y, time.perf_counter() - t0

    async def _answer(self, request: fastwire.Request, deadline: float | None) -> bytes:
        """The response's bytes; BadRequest for a request that cannot be served (bad input, a stale
        placement, or `deadline`, a time.monotonic() value, already passed)."""
        arrived = time.monotonic()
        hosted = self.hosted
        layer, x, local, weights, check_x = self._parse(request, hosted)
        if check_x and x.shape[0] <= INLINE_ROWS:  # computed inline below: check first
            _check_hidden(x, _sum_is_finite(x))
            check_x = False
        # gRPC's own deadline timer is coarse: a call already late would still be served now and then
        if deadline is not None and time.monotonic() >= deadline:
            raise BadRequest(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the experts ran")
        # a large output is written straight into the response's bytes
        buf = fastwire.ResponseBuffer(x.shape, x.dtype, request.seq) if fastwire.in_place(x.nbytes) else None
        out = buf.output if buf is not None else None
        if x.shape[0] <= INLINE_ROWS:
            # a few rows compute in well under a millisecond: a thread hop would cost more than it saves
            y, seconds = self._compute(layer, x, local, weights, out)
        else:
            running = asyncio.get_running_loop().run_in_executor(self.pool, self._compute, layer, x, local, weights, out)
            # a large hidden is summed meanwhile, on this thread (the sum releases the GIL): a bad
            # one costs a wasted compute, a good one no wait before it
            x_ok = _sum_is_finite(x) if check_x else True
            y, seconds = await running
            _check_hidden(x, x_ok)
        if self.hold is not None:  # sleeping on the loop: no CPU, other streams go on
            await asyncio.sleep(max(0.0, arrived + self.hold(local) - time.monotonic()))
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
        hosted = [moe_pb2.HostedExpert(layer=l, expert=e) for l, h in layers for e in h.expert_ids]
        w = layers[0][1].experts.gate_up_proj if layers else None
        return moe_pb2.DescribeResponse(
            worker_id=self.worker_id, hosted=hosted, replicas_per_layer=self.replicas_per_layer,
            device=str(w.device) if w is not None else "", dtype=str(w.dtype).removeprefix("torch.") if w is not None else "",
            max_message_bytes=self.max_message_bytes,
        )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: "health.aio.HealthServicer"
    servicer: ExpertServicer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", EXPERT_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)


async def start_expert_server(
    servicer: ExpertServicer, host: str = "127.0.0.1", ports: tuple[int, int] | None = None,
    tls: TLSConfig | None = None,
) -> RunningServer:
    """Starts the server on the first free port of `ports` (inclusive), or any free port, and marks it
    SERVING."""
    # here rather than at the top: the servicer alone (a GPU check's bare server) needs neither
    from grpc_health.v1 import health, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.aio.server(options=grpc_options(servicer.max_message_bytes))
    # RunExperts (de)serialises with fastwire (protobuf bytes without protobuf's copies); Describe as generated
    handlers = {
        "RunExperts": grpc.unary_unary_rpc_method_handler(
            servicer.RunExperts, request_deserializer=fastwire.decode_request, response_serializer=None),
        "RunExpertsStream": grpc.stream_stream_rpc_method_handler(
            servicer.RunExpertsStream, request_deserializer=fastwire.decode_request, response_serializer=None),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe, request_deserializer=moe_pb2.DescribeRequest.FromString,
            response_serializer=moe_pb2.DescribeResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(EXPERT_SERVICE, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (moe_pb2.DESCRIPTOR.services_by_name["Expert"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = 0
    for port in range(ports[0], ports[1] + 1) if ports else (0,):
        addr = f"{host}:{port}"
        try:
            bound = server.add_secure_port(addr, tls.server_credentials()) if tls else server.add_insecure_port(addr)
        except RuntimeError:  # taken (newer gRPC raises, older returns 0)
            bound = 0
        if bound:
            break
    if not bound:
        raise OSError(f"no free port for the expert server in {ports} on {host}")
    await server.start()
    running = RunningServer(server, bound, health_servicer, servicer)
    await running.set_serving(True)
    return running
