"""Clients of the expert workers' gRPC service: `ExpertStreams`, the gateway's data path (a
thread's own long-lived RunExpertsStream per worker), and `ExpertClient`, unary calls for tools,
tests and benchmarks."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import grpc
import torch

from moe_service.transport import fastwire
from moe_service.transport.options import DEFAULT_MAX_MESSAGE_BYTES, TLSConfig, grpc_options
from moe_service.transport.pb import moe_pb2, moe_pb2_grpc


def _channel(address: str, max_message_bytes: int, tls: TLSConfig | None) -> grpc.aio.Channel:
    opts = grpc_options(max_message_bytes)
    if tls:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), opts + tls.channel_options())
    return grpc.aio.insecure_channel(address, options=opts)


class ExpertClient:
    """Unary calls (for tools, tests and benchmarks): one channel per worker address, reused."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: TLSConfig | None = None) -> None:
        self.max_message_bytes, self.tls = max_message_bytes, tls
        self._stubs: dict[str, moe_pb2_grpc.ExpertStub] = {}
        self._run: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> moe_pb2_grpc.ExpertStub:
        if address not in self._stubs:
            ch = self._channels[address] = _channel(address, self.max_message_bytes, self.tls)
            self._stubs[address] = moe_pb2_grpc.ExpertStub(ch)
            # the hot call skips protobuf's copies (fastwire writes the same bytes), and is decoded
            # in run(), which knows the output's shape
            self._run[address] = ch.unary_unary("/moe.v1.Expert/RunExperts", request_serializer=None,
                                                response_deserializer=None)
        return self._stubs[address]

    async def run(self, address: str, layer: int, hidden: torch.Tensor, experts: torch.Tensor,
                  weights: torch.Tensor, timeout: float | None = None, rows: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, float]:
        """hidden [N, D] (or [T, D] and the N `rows` of it to send), experts [N, K], weights [N, K]
        -> (output [N, D], the worker's compute seconds)"""
        self.stub(address)
        payload = fastwire.encode_request(layer, hidden, experts, weights, rows)
        resp = fastwire.decode_response(await self._run[address](payload, timeout=timeout))
        _check_answer(resp, (hidden.dtype, (experts.shape[0], hidden.shape[1])))
        return resp.output, resp.compute_seconds

    async def describe(self, address: str, timeout: float | None = 5.0) -> moe_pb2.DescribeResponse:
        return await self.stub(address).Describe(moe_pb2.DescribeRequest(), timeout=timeout)

    async def forget(self, address: str) -> None:
        """Close the channel of a worker that went away."""
        self._stubs.pop(address, None)
        self._run.pop(address, None)
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        for address in list(self._channels):
            await self.forget(address)


def _check_answer(resp: fastwire.Response, expect: tuple[torch.dtype, tuple[int, int]]) -> None:
    """An answer's output must be the rows that were sent, in their dtype."""
    dtype, shape = expect
    if resp.output is not None and (resp.output.dtype != dtype or tuple(resp.output.shape) != shape):
        raise fastwire.CodecError(f"the worker answered {resp.output.dtype} x {list(resp.output.shape)}; "
                                  f"{dtype} x {list(shape)} was sent")


STATUS = {c.value[0]: c for c in grpc.StatusCode}
STREAM_METHOD = "/moe.v1.Expert/RunExpertsStream"


class WireError(Exception):
    """A request on a stream that got no answer, or an error answer; `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message

    @classmethod
    def broken(cls, e: grpc.aio.AioRpcError) -> "WireError":
        """The stream failed under a request (not an answer): a worker that died or a connection that
        broke can show as INTERNAL or UNKNOWN from gRPC's core as well as UNAVAILABLE."""
        code = e.code()
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            code = grpc.StatusCode.UNAVAILABLE
        return cls(code, f"the stream broke: {e.details() or e.code().name}")


@dataclass
class Sent:
    """One request written on a stream, awaiting its answer."""

    address: str
    seq: int
    expect: tuple[torch.dtype, tuple[int, int]]  # the output's dtype and shape
    error: WireError | None = None  # the write failed: there is nothing to wait for
    answered: float = 0.0  # time.perf_counter() when its answer (or error) was read
    writing: "asyncio.Task | None" = None
    deadline: float = float("inf")  # its own (time.monotonic()): past it, the worker is taken for lost


class ExpertStreams:
    """One thread's streams to the expert workers: a private event loop, a channel per worker address,
    and one long-lived RunExpertsStream on each, on which this thread writes a request and then reads
    its answer itself (no hand-off to another thread or loop). Not thread-safe: a thread has its own.

    A stream whose answer does not come by the deadline is reset (and reopened at its next use), so a
    late answer can never be taken for a later request's; an answer with another request's `seq` is
    dropped all the same. A broken stream is reopened at its next use."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: TLSConfig | None = None) -> None:
        self.max_message_bytes, self.tls = max_message_bytes, tls
        self.loop = asyncio.new_event_loop()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, grpc.aio.StreamStreamCall] = {}
        self._seq = itertools.count(1)

    @property
    def addresses(self) -> set[str]:
        """The addresses this thread holds a stream to."""
        return set(self._streams)

    def next_seq(self) -> int:
        return next(self._seq)

    def send(self, messages: list[tuple[str, bytes, int, tuple]], deadline: float | list[float]) -> list[Sent]:
        """Writes each (address, request bytes, their seq, the expected output's (dtype, shape)) on the
        address's stream; `deadline` is a time.monotonic() value, or one per message."""
        return self.loop.run_until_complete(self._send_all(messages, deadline))

    def receive(self, sent: list[Sent]) -> list[fastwire.Response | WireError]:
        """The answer to each request sent, or why there is none, in the same order; each waits until its
        own deadline (from `send`)."""
        return self.loop.run_until_complete(self._receive_all(sent))

    def keep_only(self, addresses: set[str]) -> None:
        """Close the streams and channels to workers a new table no longer lists (from any thread
        while none uses these streams)."""
        gone = [a for a in self._channels if a not in addresses]
        if gone:
            self.loop.run_until_complete(self._close(gone))

    def close(self) -> None:
        """From any thread while none uses these streams."""
        if not self.loop.is_closed():
            self.loop.run_until_complete(self._close(list(self._channels)))
            self.loop.close()

    # ---- on the loop ----------------------------------------------------------------------------

    def _stream(self, address: str) -> grpc.aio.StreamStreamCall:
        call = self._streams.get(address)
        if call is None or call.done():  # first use, or it broke since the last one
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = _channel(address, self.max_message_bytes, self.tls)
            call = self._streams[address] = ch.stream_stream(
                STREAM_METHOD, request_serializer=None, response_deserializer=None)()
        return call

    def _reset(self, address: str) -> None:
        call = self._streams.pop(address, None)
        if call is not None:
            call.cancel()

    async def _send_all(self, messages: list[tuple[str, bytes, int, tuple]], deadline: float) -> list[Sent]:
        deadlines = deadline if isinstance(deadline, list) else [deadline] * len(messages)
        sent = [Sent(address, seq, expect, deadline=d) for (address, _, seq, expect), d in zip(messages, deadlines)]
        for s, (_, payload, _, _) in zip(sent, messages):
            s.writing = self.loop.create_task(self._write(s, payload, s.deadline))
        # one turn of the loop hands each message to gRPC's core, which sends it; the writes' completions
        # are taken with the answers, not waited for here (docs/performance.md, data plane)
        await asyncio.sleep(0)
        return sent

    async def _write(self, sent: Sent, payload: bytes, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await self._stream(sent.address).write(payload)
        except TimeoutError:
            self._reset(sent.address)
            sent.error = WireError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request could not be written in time")
        except grpc.aio.AioRpcError as e:
            self._reset(sent.address)
            sent.error = WireError.broken(e)
        except asyncio.InvalidStateError:  # the stream ended as we wrote
            self._reset(sent.address)
            sent.error = WireError(grpc.StatusCode.UNAVAILABLE, "the stream ended")

    async def _receive_all(self, sent: list[Sent]) -> list[fastwire.Response | WireError]:
        if len(sent) == 1:
            return [await self._read(sent[0])]
        return list(await asyncio.gather(*(self._read(s) for s in sent)))

    async def _read(self, sent: Sent) -> fastwire.Response | WireError:
        answer = await self._answer(sent, sent.deadline)
        sent.answered = time.perf_counter()
        return answer

    async def _answer(self, sent: Sent, deadline: float) -> fastwire.Response | WireError:
        await sent.writing
        if sent.error is not None:
            return sent.error
        call = self._streams.get(sent.address)
        if call is None:  # reset since the write (another request to the same address failed)
            return WireError(grpc.StatusCode.UNAVAILABLE, "the stream was reset")
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    data = await call.read()
                    if data is grpc.aio.EOF:
                        self._reset(sent.address)
                        return WireError(grpc.StatusCode.UNAVAILABLE, "the worker ended the stream")
                    resp = fastwire.decode_response(data)
                    if resp.seq == sent.seq:
                        break  # else another request's answer, one that came too late: dropped
        except TimeoutError:
            self._reset(sent.address)
            return WireError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer before the deadline")
        except grpc.aio.AioRpcError as e:
            self._reset(sent.address)
            return WireError.broken(e)
        except fastwire.CodecError as e:  # not a RunExpertsResponse: nothing more on this stream can be trusted
            self._reset(sent.address)
            return WireError(grpc.StatusCode.INTERNAL, f"the worker's answer does not parse: {e}")
        if resp.error_code:
            return WireError(STATUS.get(resp.error_code, grpc.StatusCode.UNKNOWN), resp.error)
        try:
            _check_answer(resp, sent.expect)
        except fastwire.CodecError as e:
            return WireError(grpc.StatusCode.INTERNAL, str(e))
        return resp

    async def _close(self, addresses: list[str]) -> None:
        calls = [self._streams.pop(a) for a in addresses if a in self._streams]
        for call in calls:
            call.cancel()
        await asyncio.gather(*(call.code() for call in calls))  # each call sees its end before the loop may close
        for address in addresses:
            ch = self._channels.pop(address, None)
            if ch is not None:
                await ch.close()
