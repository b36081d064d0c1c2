"""Stage times of one micro-batch's step, for metrics.

On the CPU a stage's time is the host's. On CUDA the model's stages (attention, gating) are kernels that
run after the host has moved on, so they are timed by CUDA events and read once the step has synchronised
(its sampled tokens come to the host at its end); stages the host itself spends (a dispatch's planning and
waiting) are added as host seconds either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections import defaultdict

import torch


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def mark(self) -> "float | torch.cuda.Event":
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, stage: str, since: "float | torch.cuda.Event") -> None:
        if not self.cuda:
            self.seconds[stage] += time.perf_counter() - since
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((stage, since, end))

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def totals(self) -> dict[str, float]:
        """Seconds per stage; after the step (CUDA events are read, waiting for the last if need be)."""
        for stage, start, end in self._events:
            end.synchronize()
            self.seconds[stage] += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return dict(self.seconds)


def name_os_thread(name: str) -> None:
    """The calling thread's name as the OS shows it (top -H, /proc/<pid>/task/*/comm; Linux, 15 bytes): the
    engine's threads are told apart from the event loop's when CPU is counted per thread."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError, TypeError):
        pass
