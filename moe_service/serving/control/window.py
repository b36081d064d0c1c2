"""The load window: routed tokens per (MoE layer, expert) that gateways reported recently. A value:
adding a report gives a new window, so readers (stats, the HTTP surface) never see it change."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# L MoE layers, E experts per layer


@dataclass(frozen=True)
class LoadWindow:
    seconds: float  # reports older than this are forgotten
    reports: tuple[tuple[float, np.ndarray], ...] = ()  # (time.monotonic(), counts [L, E]), oldest first

    def add(self, now: float, counts: np.ndarray) -> "LoadWindow":
        kept = tuple(r for r in self.reports if r[0] >= now - self.seconds)
        return LoadWindow(self.seconds, kept + ((now, np.asarray(counts, dtype=np.float64)),))

    def total(self, now: float, shape: tuple[int, int]) -> np.ndarray:
        """Routed tokens over the window: [L, E]."""
        out = np.zeros(shape)
        for t, counts in self.reports:
            if t >= now - self.seconds:
                out += counts
        return out

    def pairs_per_second(self, now: float, interval_s: float) -> float:
        """(token, expert) pairs routed per second over the last `interval_s`."""
        recent = sum(float(c.sum()) for t, c in self.reports if t > now - interval_s)
        return recent / max(interval_s, 1e-6)
