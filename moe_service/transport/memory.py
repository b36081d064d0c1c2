"""Process memory settings for moving multi-MB messages: keep freed buffers for reuse.

glibc maps every allocation above its mmap threshold afresh and unmaps it when freed, so each large
dispatch would pay page faults for each of its message buffers. Raising the threshold to glibc's
32 MiB ceiling keeps them, as jemalloc and tcmalloc do: a process's RSS is then its high-water mark.
Measurements: docs/performance.md, "Transport" (Allocator).
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
