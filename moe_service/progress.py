"""A dependency-free progress line for long operations (weight loading, benchmarks)."""

from __future__ import annotations

import sys
import time


def _human(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:,.0f} {unit}"
    for u in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or u == "GiB":
            return f"{n:.1f} {u}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """Redraws one stderr line on a terminal; elsewhere prints at each 25% so logs stay short."""

    def __init__(self, label: str, total: float, unit: str = "", enabled: bool = True) -> None:
        self.label, self.total, self.unit, self.enabled = label, max(total, 1), unit, enabled
        self.done = 0.0
        self.t0 = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.next_mark = 0.25

    def advance(self, n: float = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        frac = self.done / self.total
        if self.tty and now - self.last > 0.1:
            self.last = now
            self._draw(frac, end="\r")
        elif not self.tty and frac >= self.next_mark:
            self.next_mark = (int(frac * 4) + 1) / 4
            self._draw(frac, end="\n")

    def _draw(self, frac: float, end: str) -> None:
        elapsed = time.monotonic() - self.t0
        sys.stderr.write(
            f"{self.label}: {frac:6.1%} ({_human(self.done, self.unit)} / {_human(self.total, self.unit)}, "
            f"{elapsed:.1f}s){end}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and (self.tty or self.done < self.total):
            self._draw(self.done / self.total, end="\n")
