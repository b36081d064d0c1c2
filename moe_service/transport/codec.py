"""torch tensors <-> moe.v1.Tensor: dtype, shape, raw little-endian bytes."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import torch

from moe_service.model.args import DTYPES as MODEL_DTYPES
from moe_service.transport.pb import moe_pb2

# what the wire carries: the model's dtypes, and the ids' integers
DTYPES: dict[str, torch.dtype] = {**MODEL_DTYPES, "int32": torch.int32, "int64": torch.int64}
NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}
MAX_DIMS = 8

# torch.frombuffer warns on every read-only buffer (bytes); decoded tensors view the received bytes
# and are never written through, so that one warning is silenced here rather than per call with
# warnings.catch_warnings(), which costs more than decoding a one-token tensor
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("moe_service.transport.codec assumes a little-endian host")


class CodecError(ValueError):
    """A Tensor message that does not describe a valid tensor; the message names the field."""


def encode(t: torch.Tensor, out: moe_pb2.Tensor | None = None) -> moe_pb2.Tensor:
    if t.dtype not in NAMES:
        raise CodecError(f"dtype {t.dtype} cannot be sent; supported: {sorted(DTYPES)}")
    msg = out if out is not None else moe_pb2.Tensor()
    msg.dtype = NAMES[t.dtype]
    msg.shape[:] = list(t.shape)
    # one copy into the message's bytes; viewing as bytes first works for bf16, which numpy lacks
    msg.data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return msg


def decode(msg: moe_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """A tensor over the message's bytes. Reading `msg.data` is protobuf's one copy out of its arena;
    the tensor then views those bytes without another (read-only in spirit: clone before writing)."""
    return decode_bytes(msg.dtype, list(msg.shape), msg.data, field)


def decode_bytes(dtype_name: str, shape: list[int], data: bytes, field: str = "tensor") -> torch.Tensor:
    return Raw.checked(dtype_name, shape, data, field).tensor()


@dataclass(slots=True)
class Raw:
    """A received tensor before it is one: dtype name, shape and bytes, checked to agree; `tensor()` views
    the bytes (no copy)."""

    dtype: str
    shape: list[int]
    data: bytes | memoryview

    @classmethod
    def checked(cls, dtype_name: str, shape: list[int], data: bytes | memoryview, field: str) -> "Raw":
        if dtype_name not in DTYPES:
            raise CodecError(f"{field}.dtype is {dtype_name!r}; supported: {sorted(DTYPES)}")
        if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
            raise CodecError(f"{field}.shape {shape} is invalid: at most {MAX_DIMS} non-negative dims")
        need = math.prod(shape) * ITEMSIZE[dtype_name]
        if len(data) != need:
            raise CodecError(f"{field} has {len(data)} bytes; {dtype_name} x {shape} needs {need}")
        return cls(dtype_name, shape, data)

    @property
    def numel(self) -> int:
        return len(self.data) // ITEMSIZE[self.dtype]

    def tensor(self) -> torch.Tensor:
        if not self.data:
            return torch.empty(self.shape, dtype=DTYPES[self.dtype])
        return torch.frombuffer(self.data, dtype=DTYPES[self.dtype]).view(self.shape)
