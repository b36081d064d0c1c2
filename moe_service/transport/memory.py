"""Memory for moving multi-MB messages: freed buffers kept for reuse, `bytes` written in place; and what a
process holds.

glibc maps every allocation above its mmap threshold afresh and unmaps it when freed, so each large
dispatch would pay page faults for each of its message buffers. Raising the threshold to glibc's
32 MiB ceiling keeps them, as jemalloc and tcmalloc do: a process's RSS is then its high-water mark.
Measurements: docs/performance.md, "Transport" (Allocator).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable

MMAP_THRESHOLD = 32 << 20  # glibc's maximum
TRIM_THRESHOLD = 1 << 30  # give memory back to the OS only beyond 1 GiB free at the heap's top
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h

_applied = False


def keep_large_buffers() -> bool:
    """Apply the settings to this process once (glibc only). Skipped when the user chose their own
    (GLIBC_TUNABLES naming malloc) or opted out with MOE_SERVICE_MALLOC_TUNING=0. True if applied."""
    global _applied
    if _applied:
        return True
    if os.environ.get("MOE_SERVICE_MALLOC_TUNING", "1") == "0" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS), or no C library found
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def _bytes_writer() -> Callable[[int], tuple[bytes, memoryview]] | None:
    """A way to fill a new `bytes` object in place (CPython), or None where it does not work.
    gRPC sends only `bytes`; filling one directly saves a copy of a large tensor (to join it to its
    header), when whatever produces the tensor can write it into the message instead."""
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
        offset = bytes.__basicsize__ - 1  # where a bytes object's characters start

        def writable(n: int) -> tuple[bytes, memoryview]:
            b = new(None, n)  # uninitialised, n >= 2 so never a shared singleton
            mem = (ctypes.c_char * n).from_address(id(b) + offset)
            mem.owner = b  # the memory lives as long as any view of it
            return b, memoryview(mem).cast("B")

        b, mem = writable(4)
        mem[:] = b"\x01\x02\x03\x04"
        return writable if b == b"\x01\x02\x03\x04" else None
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - not CPython
        return None



writable_bytes = _bytes_writer()  # n -> (a new bytes object of n bytes, a writable view of them), or None


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """A process's resident memory now (VmRSS) and at its peak (VmHWM), in bytes (Linux; zeros elsewhere)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def release_free_memory() -> None:
    """Give the heap's free memory back to the OS once (glibc's malloc_trim): after a weight load, whose
    temporaries would otherwise stay resident under the settings above."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def device_memory(device: str, node: str) -> dict:
    """Memory the experts of a worker computing on `device` draw from: `pool` names it (workers sharing it
    report the same name: a node's RAM, or one GPU of a node), `free_bytes` is what is free there now
    (MemAvailable; the CUDA driver's free memory), `total_bytes` its size."""
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return {"pool": f"{node}/{torch.cuda.get_device_properties(device).uuid}", "free_bytes": int(free),
                "total_bytes": int(total)}
    out = {"MemAvailable": 0, "MemTotal": 0}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:  # not Linux: unknown, so nothing is assumed to fit
        pass
    return {"pool": node, "free_bytes": out["MemAvailable"], "total_bytes": out["MemTotal"]}
