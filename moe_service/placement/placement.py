"""The ``Placement`` value: which worker hosts which expert replicas, per layer; load arrays.

A load array is ``[L, E]`` (L layers, E experts) of non-negative token counts,
e.g. how many tokens the gate routed to each expert over a window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT = "moe_service.placement/v1"
_SUM_TOL = 1e-6  # how far an expert's split fractions may stray from summing to 1


@dataclass(frozen=True, eq=False)
class Placement:
    """Replicas of every (layer, expert) on workers, and how tokens split over them.

    ``hosts[l, e, w]`` says worker ``w`` holds a replica of expert ``e`` of
    layer ``l``; ``fractions[l, e, w]`` is the share of that expert's tokens the
    replica should serve (zero off ``hosts``, summing to 1 over workers; a
    hosted replica may get 0). Both are ``[L, E, W]`` and stored read-only.
    The worker set is the same for all layers; in each layer a worker holds at
    most ``replicas_per_worker`` replicas.
    """

    hosts: np.ndarray
    fractions: np.ndarray
    replicas_per_worker: int

    def __post_init__(self) -> None:
        hosts = np.array(self.hosts, dtype=bool)
        fractions = np.array(self.fractions, dtype=np.float64)
        if hosts.ndim != 3 or fractions.shape != hosts.shape:
            raise ValueError("hosts and fractions must both be [layers, experts, workers] arrays, "
                             f"got shapes {hosts.shape} and {fractions.shape}")
        spw = self.replicas_per_worker
        check_sizes(*hosts.shape, spw)
        missing = np.argwhere(~hosts.any(axis=2))
        if missing.size:
            raise ValueError(f"expert {missing[0, 1]} of layer {missing[0, 0]} has no replica")
        used = hosts.sum(axis=1)  # [L, W]
        if used.max() > spw:
            layer, worker = np.argwhere(used > spw)[0]
            raise ValueError(f"worker {worker} holds {used[layer, worker]} replicas in layer {layer}, "
                             f"more than its {spw} slots")
        if not np.all(np.isfinite(fractions)) or np.any(fractions < 0):
            raise ValueError("fractions must be finite and non-negative")
        if np.any(fractions[~hosts] != 0):
            raise ValueError("fractions must be zero where no replica is hosted")
        off = np.abs(fractions.sum(axis=2) - 1.0) > _SUM_TOL  # [L, E]
        if off.any():
            layer, expert = np.argwhere(off)[0]
            raise ValueError(f"fractions of expert {expert} in layer {layer} sum to {fractions[layer, expert].sum()}, "
                             "not 1")
        for name, arr in (("hosts", hosts), ("fractions", fractions)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "replicas_per_worker", int(spw))

    @property
    def num_layers(self) -> int:
        return self.hosts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.hosts.shape[1]

    @property
    def num_workers(self) -> int:
        return self.hosts.shape[2]

    @property
    def num_replicas(self) -> int:
        """Replicas over all layers and experts."""
        return int(self.hosts.sum())

    def replicas(self, layer: int, expert: int) -> list[int]:
        """Ids of the (distinct) workers hosting ``expert`` of ``layer``, ascending."""
        return [w for w, _ in self.share(layer, expert)]

    def share(self, layer: int, expert: int) -> list[tuple[int, float]]:
        """``(worker, fraction)`` for each replica of ``expert`` in ``layer``, by worker id.

        The gateway sends that fraction of the expert's tokens to that worker;
        fractions sum to 1 (a replica may get 0, e.g. a hedge kept for drift).
        """
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise IndexError(f"(layer {layer}, expert {expert}) out of range for {self!r}")
        workers = np.flatnonzero(self.hosts[layer, expert])
        return [(int(w), float(self.fractions[layer, expert, w])) for w in workers]

    def hosted(self, worker: int) -> list[tuple[int, int]]:
        """Sorted ``(layer, expert)`` pairs whose replica ``worker`` holds."""
        if not 0 <= worker < self.num_workers:
            raise IndexError(f"worker {worker} out of range [0, {self.num_workers})")
        return [(int(l), int(e)) for l, e in np.argwhere(self.hosts[:, :, worker])]

    def replica_counts(self) -> np.ndarray:
        """Replicas per expert, ``[L, E]`` int."""
        return self.hosts.sum(axis=2)

    def used_replicas(self) -> np.ndarray:
        """Replicas per worker, ``[L, W]`` int (each at most ``replicas_per_worker``)."""
        return self.hosts.sum(axis=1)

    def worker_load(self, load: Any) -> np.ndarray:
        """Expected tokens per worker, ``[L, W]``, for ``load`` ``[L, E]`` split by ``share``."""
        arr = as_load(load)
        if arr.shape != self.hosts.shape[:2]:
            raise ValueError(f"load has shape {arr.shape}, expected [layers, experts] = {self.hosts.shape[:2]}")
        return np.einsum("le,lew->lw", arr, self.fractions)

    def balancedness(self, load: Any) -> np.ndarray:
        """Mean / max worker load per layer, ``[L]`` in (0, 1]; 1.0 for idle layers."""
        per_worker = self.worker_load(load)
        peak = per_worker.max(axis=1)
        return np.where(peak > 0, per_worker.mean(axis=1) / np.where(peak > 0, peak, 1.0), 1.0)

    def moves_from(self, other: Placement) -> int:
        """Replicas in ``self`` absent, at the same (layer, expert, worker), from ``other``.

        This is the number of expert weight copies a switch from ``other`` to
        ``self`` must transfer; ``other`` may have a different worker count.
        """
        if other.hosts.shape[:2] != self.hosts.shape[:2]:
            raise ValueError(f"cannot compare placements of {other.num_layers}x{other.num_experts} "
                             f"and {self.num_layers}x{self.num_experts} (layers x experts)")
        common = min(self.num_workers, other.num_workers)
        new_here = self.hosts[:, :, :common] & ~other.hosts[:, :, :common]
        return int(new_here.sum() + self.hosts[:, :, common:].sum())

    @classmethod
    def round_robin(cls, num_layers: int, num_experts: int, num_workers: int, replicas_per_worker: int) -> Placement:
        """Every expert once, expert ``e`` on worker ``e % W`` (start-up, before any load)."""
        check_sizes(num_layers, num_experts, num_workers, replicas_per_worker)
        hosts = np.zeros((num_layers, num_experts, num_workers), dtype=bool)
        experts = np.arange(num_experts)
        hosts[:, experts, experts % num_workers] = True
        return cls(hosts=hosts, fractions=hosts.astype(np.float64), replicas_per_worker=replicas_per_worker)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; ``layers[l][e]`` is the ``[[worker, fraction], ...]`` of ``share(l, e)``."""
        experts = range(self.num_experts)
        layers = [[[list(p) for p in self.share(l, e)] for e in experts] for l in range(self.num_layers)]
        return {"format": FORMAT, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "num_workers": self.num_workers, "replicas_per_worker": self.replicas_per_worker, "layers": layers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on malformed input."""
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown placement format {data.get('format')!r}, expected {FORMAT!r}")
            shape = tuple(int(data[k]) for k in ("num_layers", "num_experts", "num_workers"))
            spw, layers = int(data["replicas_per_worker"]), data["layers"]
            check_sizes(*shape, spw)
            if len(layers) != shape[0] or any(len(row) != shape[1] for row in layers):
                raise ValueError(f"layers must be a {shape[0]} x {shape[1]} nested list")
            hosts = np.zeros(shape, dtype=bool)
            fractions = np.zeros(shape)
            for l, row in enumerate(layers):
                for e, pairs in enumerate(row):
                    for worker, fraction in pairs:
                        w = int(worker)
                        if not 0 <= w < shape[2]:
                            raise ValueError(f"worker {w} out of range [0, {shape[2]})")
                        if hosts[l, e, w]:
                            raise ValueError(f"worker {w} listed twice for expert {e} of layer {l}")
                        hosts[l, e, w] = True
                        fractions[l, e, w] = float(fraction)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed placement dict: {exc!r}") from exc
        return cls(hosts=hosts, fractions=fractions, replicas_per_worker=spw)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        same = self.replicas_per_worker == other.replicas_per_worker and np.array_equal(self.hosts, other.hosts)
        return bool(same and np.array_equal(self.fractions, other.fractions))

    __hash__ = None  # type: ignore[assignment]  # holds arrays; equality is by value

    def __repr__(self) -> str:
        sizes = f"layers={self.num_layers}, experts={self.num_experts}, workers={self.num_workers}"
        return f"Placement({sizes}, replicas_per_worker={self.replicas_per_worker}, replicas={self.num_replicas})"


def balancedness(placement: Placement, load: Any) -> np.ndarray:
    """Mean / max worker load per layer, ``[L]``; see :meth:`Placement.balancedness`."""
    return placement.balancedness(load)


def check_sizes(num_layers: int, num_experts: int, num_workers: int, replicas_per_worker: int) -> None:
    """Raise ``ValueError`` unless the sizes are positive ints with room for every expert."""
    for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("num_workers", num_workers),
                        ("replicas_per_worker", replicas_per_worker)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_workers * replicas_per_worker < num_experts:
        raise ValueError(f"not enough slots: {num_workers} workers x {replicas_per_worker} slots per worker "
                         f"= {num_workers * replicas_per_worker} slots per layer, but {num_experts} experts "
                         "need at least one replica each")


def as_load(load: object, *, name: str = "load") -> np.ndarray:
    """Return ``load`` as a float64 ``[L, E]`` array, or raise ``ValueError``.

    Rejects non-2-D input, empty dimensions, NaN/inf and negative values.
    """
    try:
        arr = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric [layers, experts] array: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [layers, experts] array, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have at least one layer and one expert, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.any(arr < 0):
        layer, expert = np.argwhere(arr < 0)[0]
        raise ValueError(f"{name} must be non-negative, got {float(arr[layer, expert])!r} "
                         f"at layer {layer}, expert {expert}")
    return arr


def zipf_load(num_layers: int, num_experts: int, exponent: float, total: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-skewed ``[L, E]`` load: expert of rank r gets a share ∝ 1 / r**exponent.

    Each layer sums to ``total`` tokens (as float expectations, not rounded) and
    has its own random permutation of which expert is hot.
    """
    if num_layers < 1 or num_experts < 1:
        raise ValueError(f"need at least one layer and one expert, got {num_layers} layers and {num_experts} experts")
    if total < 0:
        raise ValueError(f"total must be non-negative, got {total}")
    shares = np.arange(1, num_experts + 1, dtype=np.float64) ** (-float(exponent))
    shares /= shares.sum()
    return np.stack([shares[rng.permutation(num_experts)] * total for _ in range(num_layers)])
