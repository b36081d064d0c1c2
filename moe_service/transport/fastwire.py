"""RunExperts on the wire without protobuf's copies or objects, byte-compatible with moe.v1 protobuf.

A message is written as cached headers around the tensors' bytes, joined once, and read by slicing a
memoryview of the received bytes, so a large tensor decodes with no copy. The encoding is plain
protobuf: clients and servers using the generated moe_pb2 classes interoperate (the tests send both).
Reading walks the layout protobuf and this module write; any other valid layout is read by protobuf's
own parser (moe_pb2), yielding checked `Raw` bytes that become tensors only where needed. Why the small
path makes so few calls, with the measurements: docs/performance.md, "Transport".
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
from moe_service.transport.memory import writable_bytes
from moe_service.transport.pb import moe_pb2

SMALL_MESSAGE = 64 << 10  # bytes; below this a tensor's bytes are copied (one C call) rather than viewed

# protobuf wire types (length-delimited, varint, 64-bit)
_LD, _VARINT, _I64 = 2, 0, 1


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
    if not (t.is_cpu and t.is_contiguous()):
        t = t.detach().cpu().contiguous()
    n = t.nbytes
    if n < SMALL_MESSAGE:
        data = ctypes.string_at(t.data_ptr(), n)
    else:
        data = memoryview(t.detach().view(torch.uint8).numpy()).cast("B")
    return [_header(field, t.dtype, t.shape), data]


def in_place(nbytes: int) -> bool:
    """Whether a tensor of nbytes is written straight into its message: worth it only when large
    (for a small one the join costs less than the set-up), and only where it works."""
    return nbytes >= SMALL_MESSAGE and writable_bytes is not None


@functools.lru_cache(maxsize=1024)
def _layer(layer: int) -> bytes:
    return _tag(1, _VARINT) + _varint(layer) if layer else b""  # proto3 omits a zero


def _request_tail(seq: int, deadline_s: float) -> bytes:
    """Fields 5 and 6 (proto3 omits zeros), after the tensors as protobuf orders fields."""
    tail = _SEQ_TAG + _varint(seq) if seq else b""
    return tail + _DEADLINE_TAG + struct.pack("<d", deadline_s) if deadline_s else tail


def encode_request(layer: int, hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                   rows: torch.Tensor | None = None, seq: int = 0, deadline_s: float = 0.0) -> bytes:
    """RunExpertsRequest bytes: hidden [N, D], experts [N, K] ids, weights [N, K], and on a stream
    the request's `seq` and the seconds left of its deadline. With `rows` [N], hidden is [T, D] and
    the message carries hidden[rows], gathered straight into its bytes when large (the gather is
    then the only copy, instead of a gather and a join)."""
    tail = _request_tail(seq, deadline_s)
    if rows is not None:
        if hidden.dtype in NAMES and hidden.is_cpu and in_place(rows.shape[0] * hidden.shape[1] * hidden.element_size()):
            return _gathered_request(layer, hidden, rows, experts, weights, tail)
        hidden = hidden[rows]
    return b"".join([_layer(layer), *_field(2, hidden), *_field(3, experts), *_field(4, weights), tail])


def _gathered_request(layer: int, hidden: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor,
                      weights: torch.Tensor, request_tail: bytes) -> bytes:
    shape = (rows.shape[0], hidden.shape[1])
    head = _layer(layer) + _header(2, hidden.dtype, shape)
    nbytes = shape[0] * shape[1] * hidden.element_size()
    tail = [*_field(3, experts), *_field(4, weights), request_tail]
    message, mem = writable_bytes(len(head) + nbytes + sum(len(part) for part in tail))
    mem[: len(head)] = head
    pos = len(head) + nbytes
    torch.index_select(hidden, 0, rows, out=torch.frombuffer(mem[len(head) : pos], dtype=hidden.dtype).view(shape))
    for part in tail:
        mem[pos : pos + len(part)] = part
        pos += len(part)
    return message


_SECONDS = _tag(2, _I64)
_SEQ_TAG, _DEADLINE_TAG = _tag(5, _VARINT), _tag(6, _I64)  # in a request
_ANSWER_SEQ, _ERROR_CODE, _ERROR = _tag(3, _VARINT), _tag(4, _VARINT), _tag(5, _LD)  # in a response


def _response_tail(compute_seconds: float, seq: int) -> bytes:
    tail = _SECONDS + struct.pack("<d", compute_seconds) if compute_seconds else b""
    return tail + _ANSWER_SEQ + _varint(seq) if seq else tail


def encode_response(output: torch.Tensor, compute_seconds: float, seq: int = 0) -> bytes:
    """RunExpertsResponse bytes: output [N, D], and on a stream the request's seq."""
    return b"".join([*_field(1, output), _response_tail(compute_seconds, seq)])


def encode_error(seq: int, code: int, message: str) -> bytes:
    """A RunExpertsResponse that answers request `seq` with an error (a grpc.StatusCode number)."""
    text = message.encode()
    return (_ANSWER_SEQ + _varint(seq) if seq else b"") + _ERROR_CODE + _varint(code) + _ERROR + _varint(len(text)) + text


class ResponseBuffer:
    """A large RunExpertsResponse written in place: the experts write their output [N, D] into
    `output`, a view of the message's own bytes, and `finish` adds the compute time."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, seq: int = 0) -> None:
        header = _header(1, dtype, tuple(shape))
        n = len(header) + math.prod(shape) * ITEMSIZE[NAMES[dtype]]
        self.seq = seq
        self.message, mem = writable_bytes(n + len(_response_tail(1.0, seq)))
        mem[: len(header)] = header
        self.output = torch.frombuffer(mem[len(header) : n], dtype=dtype).view(shape)
        self._tail = mem[n:]

    def finish(self, compute_seconds: float) -> bytes:
        # a zero time would be omitted and change the size: the smallest positive double stands in
        self._tail[:] = _response_tail(compute_seconds or 5e-324, self.seq)
        return self.message


@dataclass(slots=True)
class Response:
    """A parsed RunExpertsResponse: the output [N, D], or error_code (a grpc.StatusCode number) and error."""

    output: torch.Tensor | None
    compute_seconds: float = 0.0
    seq: int = 0
    error_code: int = 0
    error: str = ""


class _Unusual(Exception):
    """Valid protobuf, perhaps, but not laid out as protobuf and this module write it."""


def _uvarint(mv: memoryview, pos: int) -> tuple[int, int]:
    """(value, next position); IndexError past the end."""
    n = shift = 0
    while True:
        c = mv[pos]
        pos += 1
        n |= (c & 0x7F) << shift
        if c < 0x80:
            return n, pos
        shift += 7
        if shift > 63:
            raise _Unusual


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _tensor_at(mv: memoryview, pos: int, tag: int, name: str) -> tuple[Raw, int]:
    """(the Tensor field `tag` at pos, read straight through in field order: dtype, packed shape, data;
    the position after it). Any other layout raises _Unusual."""
    if mv[pos] != tag:
        raise _Unusual
    n, pos = _uvarint(mv, pos + 1)
    end = pos + n
    if end > len(mv) or mv[pos] != 0x0A:
        raise _Unusual
    n = mv[pos + 1]
    if n >= 0x80:  # a dtype name of 128 bytes or more: not one of ours, protobuf's reader says so
        raise _Unusual
    dtype = bytes(mv[pos + 2 : pos + 2 + n]).decode("ascii")
    pos += 2 + n
    shape = []
    if pos < end and mv[pos] == 0x12:
        n, pos = _uvarint(mv, pos + 1)
        stop = pos + n
        while pos < stop:
            d, pos = _uvarint(mv, pos)
            shape.append(_signed(d))
    data = mv[0:0]
    if pos < end and mv[pos] == 0x1A:
        n, pos = _uvarint(mv, pos + 1)
        data = mv[pos : pos + n]
        pos += n
    if pos != end:
        raise _Unusual
    return Raw.checked(dtype, shape, data, name), end


_NOT_OURS = (_Unusual, IndexError, UnicodeDecodeError, struct.error)


@dataclass
class Request:
    """A parsed RunExpertsRequest; `error` is set instead of raising so the handler can answer
    INVALID_ARGUMENT (a deserializer that raises would become INTERNAL)."""

    layer: int = 0
    hidden: Raw | None = None  # [N, D]
    experts: Raw | None = None  # [N, K]
    weights: Raw | None = None  # [N, K]
    seq: int = 0
    deadline_s: float = 0.0  # seconds left of the caller's deadline when sent; 0: none
    nbytes: int = 0
    error: str | None = None


def decode_request(data: bytes) -> Request:
    """The layout protobuf and this module write is read in one walk over the bytes; any other valid
    layout (fields in another order, unpacked shapes, unknown fields) by protobuf's own parser."""
    req = Request(nbytes=len(data))
    mv = memoryview(data)
    try:
        try:
            pos = 0
            if mv[0] == 0x08:
                req.layer, pos = _uvarint(mv, 1)
            req.hidden, pos = _tensor_at(mv, pos, 0x12, "hidden")
            req.experts, pos = _tensor_at(mv, pos, 0x1A, "experts")
            req.weights, pos = _tensor_at(mv, pos, 0x22, "weights")
            if pos < len(mv) and mv[pos] == 0x28:
                req.seq, pos = _uvarint(mv, pos + 1)
            if pos < len(mv) and mv[pos] == 0x31:
                req.deadline_s = struct.unpack_from("<d", mv, pos + 1)[0]
                pos += 9
            if pos != len(mv):
                raise _Unusual
        except _NOT_OURS:
            req = _request_from_protobuf(data)
    except CodecError as e:
        req.error = str(e)
    return req


def _parse(message_class, data: bytes):
    try:
        return message_class.FromString(data)
    except DecodeError as e:
        raise CodecError(f"not a valid {message_class.DESCRIPTOR.name}: {e}") from None


def _raw(msg, name: str) -> Raw:
    return Raw.checked(msg.dtype, list(msg.shape), msg.data, name)


def _request_from_protobuf(data: bytes) -> Request:
    msg = _parse(moe_pb2.RunExpertsRequest, data)
    for name in ("hidden", "experts", "weights"):
        if not msg.HasField(name):
            raise CodecError(f"{name} is missing")
    return Request(msg.layer, _raw(msg.hidden, "hidden"), _raw(msg.experts, "experts"), _raw(msg.weights, "weights"),
                   msg.seq, msg.deadline_s, len(data))


def decode_response(data: bytes) -> Response:
    """As decode_request: one walk over our layout, protobuf's parser for any other."""
    mv = memoryview(data)
    try:
        if mv and mv[0] == 0x0A:
            out, pos = _tensor_at(mv, 0, 0x0A, "output")
            resp = _tail(mv, pos)
            resp.output = out.tensor()
        else:  # no output first: an error answer
            resp = _tail(mv, 0)
    except _NOT_OURS:
        resp = _response_from_protobuf(data)
    if resp.output is None and not resp.error_code:
        raise CodecError("response has no output tensor")
    return resp


def _tail(mv: memoryview, pos: int) -> Response:
    """The fields after the output, in field order, as this module and protobuf write them."""
    resp = Response(None)
    end = len(mv)
    if pos < end and mv[pos] == 0x11:
        resp.compute_seconds = struct.unpack_from("<d", mv, pos + 1)[0]
        pos += 9
    if pos < end and mv[pos] == 0x18:
        resp.seq, pos = _uvarint(mv, pos + 1)
    if pos < end and mv[pos] == 0x20:
        resp.error_code, pos = _uvarint(mv, pos + 1)
    if pos < end and mv[pos] == 0x2A:
        n, pos = _uvarint(mv, pos + 1)
        resp.error = bytes(mv[pos : pos + n]).decode("utf-8", errors="replace")
        pos += n
    if pos != end:
        raise _Unusual
    return resp


def _response_from_protobuf(data: bytes) -> Response:
    msg = _parse(moe_pb2.RunExpertsResponse, data)
    output = _raw(msg.output, "output").tensor() if msg.HasField("output") else None
    return Response(output, msg.compute_seconds, msg.seq, msg.error_code, msg.error)
