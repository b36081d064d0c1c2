"""Process memory settings for moving multi-MB messages: keep freed buffers for reuse.

glibc serves every allocation above its mmap threshold (128 KiB to start, adapting up to 32 MiB)
with a fresh mmap and returns it with munmap when freed. A large dispatch allocates several such
buffers per call on each side (gRPC's received bytes, the joined request, the response), so each
call pays their page faults and unmapping again: on the development VM a raw gRPC echo of 8 MiB
took 33-42 ms that way and 24-27 ms with the buffers kept, and a handler that answers with newly
allocated bytes paid 8-12 ms more than one that answers with its request's (2 ms more when kept).

The cost is the usual one of a serving process's allocator (jemalloc and tcmalloc do the same):
freed memory stays in the process, so its RSS is its high-water mark. Buffers above 32 MiB,
glibc's ceiling for the threshold, are still mapped per use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

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
