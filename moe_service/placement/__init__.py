"""Expert placement policy and worker autoscaling decisions (pure functions, no Ray).

``plan(load, num_workers, replicas_per_worker, current=None)`` turns a ``[L, E]``
load (tokens per layer and expert) into a :class:`Placement`: which workers
host which replicas of every expert, per layer, and how each expert's tokens
split over its replicas. ``decide(settings, state, now, observed_load)`` is the
worker-count policy.
"""

from .autoscale import AutoscaleSettings, AutoscaleState, decide
from .placement import Placement, balancedness, zipf_load
from .planner import DEFAULT_MIN_BALANCEDNESS, plan

__all__ = ["DEFAULT_MIN_BALANCEDNESS", "AutoscaleSettings", "AutoscaleState", "Placement", "balancedness", "decide",
           "plan", "zipf_load"]
