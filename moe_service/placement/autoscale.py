"""Worker-count policy in the style of Ray Serve's ``autoscaling_config``.

A pure function ``decide(settings, state, now, observed_load) -> (workers,
state)``, called on every control tick with an explicit clock, like a Serve
custom autoscaling policy ``(context) -> (replicas, state)``. It adds or
removes one worker at a time, because every change re-places expert weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AutoscaleSettings:
    """When to add or remove a worker.

    ``target_load_per_worker`` is the load one worker should carry, in the unit
    of ``observed_load`` (e.g. routed tokens/s). The policy looks at the mean
    observed load over the last ``look_back_period_s`` seconds and at the latest
    observation. It is *overloaded* when both exceed
    ``target * workers * (1 + upscale_tolerance)``, *underloaded* when both are
    below ``target * (workers - 1) * (1 - downscale_tolerance)`` (one worker
    fewer would still have headroom). Overload lasting ``upscale_delay_s`` adds
    a worker; underload lasting ``downscale_delay_s`` removes one. The gap
    between the two thresholds keeps a load hovering near the target from
    flapping; requiring the latest observation too means a spike shorter than
    ``upscale_delay_s`` never adds a worker, however high it is.
    """

    min_workers: int
    max_workers: int
    target_load_per_worker: float
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    upscale_tolerance: float = 0.1
    downscale_tolerance: float = 0.1

    def __post_init__(self) -> None:
        for name, value in (("min_workers", self.min_workers), ("max_workers", self.max_workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})")
        for name in ("target_load_per_worker", "upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            value, delay = getattr(self, name), name.endswith("delay_s")  # a delay may be 0, the others not
            if not (math.isfinite(value) and (value >= 0 if delay else value > 0)):
                raise ValueError(f"{name} must be finite and {'>=' if delay else '>'} 0, got {value!r}")
        for name in ("upscale_tolerance", "downscale_tolerance"):
            if not 0 <= (value := getattr(self, name)) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class AutoscaleState:
    """What ``decide`` remembers between ticks.

    ``workers`` is the current desired count, ``samples`` the ``(time, load)``
    observations inside the look-back window, ``over_since`` / ``under_since``
    when the current run of overload / underload began (None outside one).
    """

    workers: int
    samples: tuple[tuple[float, float], ...] = ()
    over_since: float | None = None
    under_since: float | None = None

    @classmethod
    def initial(cls, settings: AutoscaleSettings, workers: int | None = None) -> AutoscaleState:
        """Fresh state at ``workers`` (default ``min_workers``), clamped to the bounds."""
        start = settings.min_workers if workers is None else workers
        return cls(workers=min(max(start, settings.min_workers), settings.max_workers))


def decide(
    settings: AutoscaleSettings, state: AutoscaleState, now: float, observed_load: float
) -> tuple[int, AutoscaleState]:
    """Desired worker count and the next state after observing ``observed_load`` at ``now``.

    ``observed_load`` is the total over all workers (e.g. routed tokens/s in
    the last interval); ``now`` is in seconds and must not go backwards.
    """
    if not (math.isfinite(observed_load) and observed_load >= 0):
        raise ValueError(f"observed_load must be finite and >= 0, got {observed_load!r}")
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now!r}")
    if state.samples and now < state.samples[-1][0]:
        raise ValueError(f"time went backwards: now={now} < last sample at {state.samples[-1][0]}")

    start = now - settings.look_back_period_s
    samples = tuple(s for s in state.samples if s[0] > start) + ((now, float(observed_load)),)
    mean = sum(load for _, load in samples) / len(samples)
    workers = min(max(state.workers, settings.min_workers), settings.max_workers)
    if workers != state.workers:
        # The bounds moved under us: obey them at once and start timing afresh.
        return workers, AutoscaleState(workers=workers, samples=samples)

    target = settings.target_load_per_worker
    high = target * workers * (1 + settings.upscale_tolerance)
    low = target * (workers - 1) * (1 - settings.downscale_tolerance)
    over = workers < settings.max_workers and min(mean, observed_load) > high
    under = workers > settings.min_workers and max(mean, observed_load) < low
    over_since = (now if state.over_since is None else state.over_since) if over else None
    under_since = (now if state.under_since is None else state.under_since) if under else None

    if over_since is not None and now - over_since >= settings.upscale_delay_s:
        return workers + 1, AutoscaleState(workers=workers + 1, samples=samples)
    if under_since is not None and now - under_since >= settings.downscale_delay_s:
        return workers - 1, AutoscaleState(workers=workers - 1, samples=samples)
    return workers, replace(state, samples=samples, over_since=over_since, under_since=under_since)
