"""Load arrays: validation, and a skewed-load generator for tests and benchmarks.

A load array is ``[L, E]`` (L layers, E experts) of non-negative token counts,
e.g. how many tokens the gate routed to each expert over a window.
"""

from __future__ import annotations

import numpy as np


def as_load(load: object, *, name: str = "load") -> np.ndarray:
    """Return ``load`` as a float64 ``[L, E]`` array, or raise ``ValueError``.

    Rejects non-2-D input, empty dimensions, NaN/inf and negative values.
    """
    try:
        arr = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric [layers, experts] array: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D [layers, experts] array, got shape {arr.shape}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(
            f"{name} must have at least one layer and one expert, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.any(arr < 0):
        layer, expert = np.argwhere(arr < 0)[0]
        raise ValueError(
            f"{name} must be non-negative, got {float(arr[layer, expert])!r} "
            f"at layer {layer}, expert {expert}"
        )
    return arr


def effective_load(load: np.ndarray) -> np.ndarray:
    """``[L, E]`` load with all-zero layers replaced by a uniform load.

    A layer that saw no tokens gives no signal, so planning treats every expert
    in it as equally hot rather than leaving the split undefined.
    """
    out = load.copy()
    idle = out.sum(axis=1) <= 0
    out[idle] = 1.0
    return out


def zipf_load(
    num_layers: int,
    num_experts: int,
    exponent: float,
    total: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Zipf-skewed ``[L, E]`` load: expert of rank r gets a share ∝ 1 / r**exponent.

    Each layer sums to ``total`` tokens (as float expectations, not rounded) and
    has its own random permutation of which expert is hot.
    """
    if num_layers < 1 or num_experts < 1:
        raise ValueError(
            f"need at least one layer and one expert, got {num_layers} layers "
            f"and {num_experts} experts"
        )
    if total < 0:
        raise ValueError(f"total must be non-negative, got {total}")
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    shares = ranks ** (-float(exponent))
    shares /= shares.sum()
    out = np.empty((num_layers, num_experts), dtype=np.float64)
    for layer in range(num_layers):
        out[layer] = shares[rng.permutation(num_experts)] * total
    return out
