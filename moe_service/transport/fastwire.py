"""RunExperts on the wire without protobuf's copies or objects, byte-compatible with moe.v1 protobuf.

Python protobuf copies a tensor's bytes four times per hop (into the message, out at
SerializeToString, into the parsed message, out again at `.data`). Here a message is written as
small cached headers around the tensors' bytes, joined once, and read by slicing a memoryview of
the received bytes, so a large tensor decodes with no copy at all. The encoding is plain protobuf:
any client or server using the generated moe_pb2 classes interoperates (the tests send both kinds).

A decode step's small message is what the per-call cost is made of. Between two RPCs the code of
every library it touches has left the CPU's caches, so each distinct call into protobuf or torch
costs tens of microseconds however little it does: the small path is written with as few of them
as possible (one C call for a tensor's bytes, protobuf's C parser to read, tensors only as `Raw`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import struct
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from moe_service.transport.codec import ITEMSIZE, NAMES, CodecError, Raw
from moe_service.transport.pb import moe_pb2

SMALL_MESSAGE = 64 << 10  # bytes; below this protobuf's C parser reads faster than Python walks the bytes

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


@functools.lru_cache(maxsize=4096)
def _header(field: int, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """Field `field`, a Tensor, up to its data: what protobuf writes before the tensor's bytes,
    empty fields omitted as protobuf omits them. A dispatch's shapes repeat, so this is cached."""
    name = NAMES[dtype].encode()
    nbytes = math.prod(shape) * ITEMSIZE[NAMES[dtype]]
    inner = _tag(1, _LD) + _varint(len(name)) + name
    if shape:
        packed = b"".join(_varint(d) for d in shape)
        inner += _tag(2, _LD) + _varint(len(packed)) + packed
    if nbytes:
        inner += _tag(3, _LD) + _varint(nbytes)
    return _tag(field, _LD) + _varint(len(inner) + nbytes) + inner


def _field(field: int, t: torch.Tensor) -> list:
    """[header, data] of one Tensor field: data is a copy when small (one C call, no tensor op)
    and a view of the tensor's memory when large."""
    if t.dtype not in NAMES:
        raise CodecError(f"dtype {t.dtype} cannot be sent; supported: {sorted(NAMES.values())}")
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().cpu().contiguous()
    n = t.nbytes
    if n < SMALL_MESSAGE:
        data = ctypes.string_at(t.data_ptr(), n)
    else:
        data = memoryview(t.detach().view(torch.uint8).numpy()).cast("B")
    return [_header(field, t.dtype, t.shape), data]


@functools.lru_cache(maxsize=1024)
def _layer(layer: int) -> bytes:
    return _tag(1, _VARINT) + _varint(layer) if layer else b""  # proto3 omits a zero


def encode_request(layer: int, hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> bytes:
    """RunExpertsRequest bytes: hidden [N, D], experts [N, K] ids, weights [N, K]."""
    return b"".join([_layer(layer), *_field(2, hidden), *_field(3, experts), *_field(4, weights)])


_SECONDS = _tag(2, _I64)


def encode_response(output: torch.Tensor, compute_seconds: float) -> bytes:
    """RunExpertsResponse bytes: output [N, D]."""
    seconds = _SECONDS + struct.pack("<d", compute_seconds) if compute_seconds else b""
    return b"".join([*_field(1, output), seconds])


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


def _raw(mv: memoryview, name: str) -> Raw:
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
    return Raw.checked(dtype, shape, data, name)


def _small_raw(msg: moe_pb2.Tensor, name: str) -> Raw:
    return Raw.checked(msg.dtype, list(msg.shape), msg.data, name)


@dataclass
class Request:
    """A parsed RunExpertsRequest; `error` is set instead of raising so the handler can answer
    INVALID_ARGUMENT (a deserializer that raises would become INTERNAL)."""

    layer: int = 0
    hidden: Raw | None = None  # [N, D]
    experts: Raw | None = None  # [N, K]
    weights: Raw | None = None  # [N, K]
    nbytes: int = 0
    error: str | None = None


_REQUEST_FIELDS = {2: "hidden", 3: "experts", 4: "weights"}


def decode_request(data: bytes) -> Request:
    req = Request(nbytes=len(data))
    try:
        if len(data) < SMALL_MESSAGE:
            _decode_small_request(data, req)
            return req
        for field, wire, value in _Reader(memoryview(data)).fields():
            if field == 1 and wire == _VARINT:
                req.layer = value
            elif field in _REQUEST_FIELDS and wire == _LD:
                name = _REQUEST_FIELDS[field]
                setattr(req, name, _raw(value, name))
        for name in _REQUEST_FIELDS.values():
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
    for name in _REQUEST_FIELDS.values():
        if not msg.HasField(name):
            raise CodecError(f"{name} is missing")
        setattr(req, name, _small_raw(getattr(msg, name), name))


def decode_response(data: bytes) -> tuple[torch.Tensor, float]:
    """(output [N, D], compute seconds)"""
    if len(data) < SMALL_MESSAGE:
        try:
            msg = moe_pb2.RunExpertsResponse.FromString(data)
        except DecodeError as e:
            raise CodecError(f"response is not a valid RunExpertsResponse: {e}") from None
        if not msg.HasField("output"):
            raise CodecError("response has no output tensor")
        return _small_raw(msg.output, "output").tensor(), msg.compute_seconds
    out, seconds = None, 0.0
    for field, wire, value in _Reader(memoryview(data)).fields():
        if field == 1 and wire == _LD:
            out = _raw(value, "output")
        elif field == 2 and wire == _I64:
            seconds = struct.unpack("<d", value)[0]
    if out is None:
        raise CodecError("response has no output tensor")
    return out.tensor(), seconds
