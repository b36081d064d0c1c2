"""RunExperts on the wire without protobuf's copies, byte-compatible with moe.v1 protobuf.

Python protobuf copies a tensor's bytes four times per hop (into the message, out at
SerializeToString, into the parsed message, out again at `.data`). Here a message is written as
small headers around the tensors' own memory, joined once, and read by slicing a memoryview of the
received bytes, so a tensor decodes with no copy at all. The encoding is plain protobuf: any client
or server using the generated moe_pb2 classes interoperates (the tests send both kinds).

Small messages (a decode step's few rows) go through protobuf's C parser and serializer instead:
there the copies cost nothing and walking the bytes in Python would cost more than the RPC itself.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from moe_service.transport.codec import NAMES, CodecError, decode_bytes
from moe_service.transport.pb import moe_pb2

SMALL_MESSAGE = 64 << 10  # bytes; below this protobuf's own (C) code is the faster path

# field numbers from protos/moe/v1/moe.proto
_LD, _VARINT, _I64, _I32 = 2, 0, 1, 5


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 negatives: ten-byte two's complement, as protobuf writes them
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _tensor_parts(t: torch.Tensor) -> tuple[list, int]:
    """A Tensor message as [header bytes, data buffer] and its length."""
    if t.dtype not in NAMES:
        raise CodecError(f"dtype {t.dtype} cannot be sent; supported: {sorted(NAMES.values())}")
    data = memoryview(t.detach().cpu().contiguous().view(torch.uint8).numpy()).cast("B")
    name = NAMES[t.dtype].encode()
    packed = b"".join(_varint(d) for d in t.shape)
    header = (_tag(1, _LD) + _varint(len(name)) + name + _tag(2, _LD) + _varint(len(packed)) + packed
              + _tag(3, _LD) + _varint(len(data)))
    return [header, data], len(header) + len(data)


def _field(field: int, t: torch.Tensor) -> list:
    parts, n = _tensor_parts(t)
    return [_tag(field, _LD) + _varint(n), *parts]


def _set_small(msg: moe_pb2.Tensor, t: torch.Tensor) -> None:
    if t.dtype not in NAMES:
        raise CodecError(f"dtype {t.dtype} cannot be sent; supported: {sorted(NAMES.values())}")
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().cpu().contiguous()
    msg.dtype = NAMES[t.dtype]
    msg.shape.extend(t.shape)
    if t.numel():
        msg.data = ctypes.string_at(t.data_ptr(), t.nbytes)  # one small copy, no tensor ops


def _small_tensor(msg: moe_pb2.Tensor, name: str) -> torch.Tensor:
    return decode_bytes(msg.dtype, list(msg.shape), msg.data, name)


def encode_request(layer: int, hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> bytes:
    if hidden.nbytes + experts.nbytes + weights.nbytes < SMALL_MESSAGE:
        msg = moe_pb2.RunExpertsRequest(layer=layer)
        _set_small(msg.hidden, hidden)
        _set_small(msg.experts, experts)
        _set_small(msg.weights, weights)
        return msg.SerializeToString()
    parts = [_tag(1, _VARINT) + _varint(layer)] if layer else []
    for field, t in ((2, hidden), (3, experts), (4, weights)):
        parts += _field(field, t)
    return b"".join(parts)


def encode_response(output: torch.Tensor, compute_seconds: float) -> bytes:
    if output.nbytes < SMALL_MESSAGE:
        msg = moe_pb2.RunExpertsResponse(compute_seconds=compute_seconds)
        _set_small(msg.output, output)
        return msg.SerializeToString()
    return b"".join(_field(1, output) + [_tag(2, _I64) + struct.pack("<d", compute_seconds)])


class _Reader:
    def __init__(self, mv: memoryview) -> None:
        self.mv, self.pos = mv, 0

    def varint(self) -> int:
        n = shift = 0
        while True:
            if self.pos >= len(self.mv) or shift > 63:
                raise CodecError("truncated or malformed varint")
            b = self.mv[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def fields(self):
        """(field number, wire type, value): ints for varint/fixed, memoryviews for length-delimited."""
        while self.pos < len(self.mv):
            key = self.varint()
            field, wire = key >> 3, key & 7
            if wire == _VARINT:
                yield field, wire, self.varint()
            elif wire == _LD:
                n = self.varint()
                if self.pos + n > len(self.mv):
                    raise CodecError(f"field {field} claims {n} bytes; only {len(self.mv) - self.pos} remain")
                yield field, wire, self.mv[self.pos : self.pos + n]
                self.pos += n
            elif wire in (_I64, _I32):
                size = 8 if wire == _I64 else 4
                if self.pos + size > len(self.mv):
                    raise CodecError(f"field {field} is truncated")
                yield field, wire, self.mv[self.pos : self.pos + size]
                self.pos += size
            else:
                raise CodecError(f"unsupported wire type {wire} for field {field}")


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _tensor(mv: memoryview, name: str) -> torch.Tensor:
    dtype, shape, data = "", [], memoryview(b"")
    for field, wire, value in _Reader(mv).fields():
        if field == 1 and wire == _LD:
            dtype = bytes(value).decode("utf-8", errors="replace")
        elif field == 2 and wire == _LD:  # packed
            r = _Reader(value)
            while r.pos < len(value):
                shape.append(_signed(r.varint()))
        elif field == 2 and wire == _VARINT:  # unpacked, also valid protobuf
            shape.append(_signed(value))
        elif field == 3 and wire == _LD:
            data = value
    return decode_bytes(dtype, shape, data, name)


@dataclass
class Request:
    """A parsed RunExpertsRequest; `error` is set instead of raising so the handler can answer
    INVALID_ARGUMENT (a deserializer that raises would become INTERNAL)."""

    layer: int = 0
    hidden: torch.Tensor | None = None
    experts: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    nbytes: int = 0
    error: str | None = None


def decode_request(data: bytes) -> Request:
    req = Request(nbytes=len(data))
    try:
        if len(data) < SMALL_MESSAGE:
            _decode_small_request(data, req)
            return req
        for field, wire, value in _Reader(memoryview(data)).fields():
            if field == 1 and wire == _VARINT:
                req.layer = value
            elif field in (2, 3, 4) and wire == _LD:
                name = {2: "hidden", 3: "experts", 4: "weights"}[field]
                setattr(req, name, _tensor(value, name))
        for name in ("hidden", "experts", "weights"):
            if getattr(req, name) is None:
                raise CodecError(f"{name} is missing")
    except CodecError as e:
        req.error = str(e)
    return req


def _decode_small_request(data: bytes, req: Request) -> None:
    try:
        msg = moe_pb2.RunExpertsRequest.FromString(data)
    except DecodeError as e:
        raise CodecError(f"request is not a valid RunExpertsRequest: {e}") from None
    req.layer = msg.layer
    for name in ("hidden", "experts", "weights"):
        if not msg.HasField(name):
            raise CodecError(f"{name} is missing")
        setattr(req, name, _small_tensor(getattr(msg, name), name))


def decode_response(data: bytes) -> tuple[torch.Tensor, float]:
    if len(data) < SMALL_MESSAGE:
        try:
            msg = moe_pb2.RunExpertsResponse.FromString(data)
        except DecodeError as e:
            raise CodecError(f"response is not a valid RunExpertsResponse: {e}") from None
        if not msg.HasField("output"):
            raise CodecError("response has no output tensor")
        return _small_tensor(msg.output, "output"), msg.compute_seconds
    out, seconds = None, 0.0
    for field, wire, value in _Reader(memoryview(data)).fields():
        if field == 1 and wire == _LD:
            out = _tensor(value, "output")
        elif field == 2 and wire == _I64:
            seconds = struct.unpack("<d", value)[0]
    if out is None:
        raise CodecError("response has no output tensor")
    return out, seconds
