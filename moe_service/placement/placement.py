"""The ``Placement`` value: which worker hosts which expert replicas, per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .loads import as_load

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
    most ``slots_per_worker`` replicas.
    """

    hosts: np.ndarray
    fractions: np.ndarray
    slots_per_worker: int

    def __post_init__(self) -> None:
        hosts = np.array(self.hosts, dtype=bool)
        fractions = np.array(self.fractions, dtype=np.float64)
        if hosts.ndim != 3 or fractions.shape != hosts.shape:
            raise ValueError(
                "hosts and fractions must both be [layers, experts, workers] arrays, "
                f"got shapes {hosts.shape} and {fractions.shape}"
            )
        if min(hosts.shape) < 1:
            raise ValueError(f"placement needs at least one layer, expert and worker, got {hosts.shape}")
        spw = self.slots_per_worker
        if isinstance(spw, bool) or not isinstance(spw, (int, np.integer)) or spw < 1:
            raise ValueError(f"slots_per_worker must be a positive int, got {spw!r}")
        missing = np.argwhere(~hosts.any(axis=2))
        if missing.size:
            layer, expert = missing[0]
            raise ValueError(f"expert {expert} of layer {layer} has no replica")
        used = hosts.sum(axis=1)  # [L, W]
        if used.max() > spw:
            layer, worker = np.argwhere(used > spw)[0]
            raise ValueError(
                f"worker {worker} holds {used[layer, worker]} replicas in layer {layer}, "
                f"more than its {spw} slots"
            )
        if not np.all(np.isfinite(fractions)) or np.any(fractions < 0):
            raise ValueError("fractions must be finite and non-negative")
        if np.any(fractions[~hosts] != 0):
            raise ValueError("fractions must be zero where no replica is hosted")
        sums = fractions.sum(axis=2)
        if np.any(np.abs(sums - 1.0) > _SUM_TOL):
            layer, expert = np.argwhere(np.abs(sums - 1.0) > _SUM_TOL)[0]
            raise ValueError(
                f"fractions of expert {expert} in layer {layer} sum to {sums[layer, expert]}, not 1"
            )
        hosts.setflags(write=False)
        fractions.setflags(write=False)
        object.__setattr__(self, "hosts", hosts)
        object.__setattr__(self, "fractions", fractions)
        object.__setattr__(self, "slots_per_worker", int(spw))

    # -- shape -------------------------------------------------------------

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

    # -- queries -----------------------------------------------------------

    def replicas(self, layer: int, expert: int) -> list[int]:
        """Ids of the (distinct) workers hosting ``expert`` of ``layer``, ascending."""
        self._check_index(layer, expert)
        return np.flatnonzero(self.hosts[layer, expert]).tolist()

    def share(self, layer: int, expert: int) -> list[tuple[int, float]]:
        """``(worker, fraction)`` for each replica of ``expert`` in ``layer``.

        The gateway sends that fraction of the expert's tokens to that worker;
        fractions sum to 1 (a replica may get 0, e.g. a hedge kept for drift).
        """
        self._check_index(layer, expert)
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

    def used_slots(self) -> np.ndarray:
        """Replicas per worker, ``[L, W]`` int (each at most ``slots_per_worker``)."""
        return self.hosts.sum(axis=1)

    def worker_load(self, load: Any) -> np.ndarray:
        """Expected tokens per worker, ``[L, W]``, for ``load`` ``[L, E]`` split by ``share``."""
        arr = self._check_load(load)
        return np.einsum("le,lew->lw", arr, self.fractions)

    def balancedness(self, load: Any) -> np.ndarray:
        """Mean / max worker load per layer, ``[L]`` in (0, 1]; 1.0 for idle layers."""
        per_worker = self.worker_load(load)
        peak = per_worker.max(axis=1)
        mean = per_worker.mean(axis=1)
        return np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0)

    def moves_from(self, other: Placement) -> int:
        """Replicas in ``self`` absent, at the same (layer, expert, worker), from ``other``.

        This is the number of expert weight copies a switch from ``other`` to
        ``self`` must transfer; ``other`` may have a different worker count.
        """
        if (other.num_layers, other.num_experts) != (self.num_layers, self.num_experts):
            raise ValueError(
                f"cannot compare placements of {other.num_layers}x{other.num_experts} "
                f"and {self.num_layers}x{self.num_experts} (layers x experts)"
            )
        common = min(self.num_workers, other.num_workers)
        new_here = self.hosts[:, :, :common] & ~other.hosts[:, :, :common]
        return int(new_here.sum() + self.hosts[:, :, common:].sum())

    # -- construction and serialisation ------------------------------------

    @classmethod
    def round_robin(
        cls, num_layers: int, num_experts: int, num_workers: int, slots_per_worker: int
    ) -> Placement:
        """Every expert once, expert ``e`` on worker ``e % W`` (start-up, before any load)."""
        check_sizes(num_layers, num_experts, num_workers, slots_per_worker)
        hosts = np.zeros((num_layers, num_experts, num_workers), dtype=bool)
        experts = np.arange(num_experts)
        hosts[:, experts, experts % num_workers] = True
        return cls(hosts=hosts, fractions=hosts.astype(np.float64), slots_per_worker=slots_per_worker)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; ``layers[l][e]`` is the ``[[worker, fraction], ...]`` of ``share(l, e)``."""
        layers = [
            [
                [[int(w), float(self.fractions[l, e, w])] for w in np.flatnonzero(self.hosts[l, e])]
                for e in range(self.num_experts)
            ]
            for l in range(self.num_layers)
        ]
        return {
            "format": FORMAT,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "num_workers": self.num_workers,
            "slots_per_worker": self.slots_per_worker,
            "layers": layers,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on malformed input."""
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown placement format {data.get('format')!r}, expected {FORMAT!r}")
            num_layers = int(data["num_layers"])
            num_experts = int(data["num_experts"])
            num_workers = int(data["num_workers"])
            spw = int(data["slots_per_worker"])
            layers = data["layers"]
            check_sizes(num_layers, num_experts, num_workers, spw)
            if len(layers) != num_layers or any(len(row) != num_experts for row in layers):
                raise ValueError(f"layers must be a {num_layers} x {num_experts} nested list")
            hosts = np.zeros((num_layers, num_experts, num_workers), dtype=bool)
            fractions = np.zeros((num_layers, num_experts, num_workers))
            for l, row in enumerate(layers):
                for e, pairs in enumerate(row):
                    for worker, fraction in pairs:
                        w = int(worker)
                        if not 0 <= w < num_workers:
                            raise ValueError(f"worker {w} out of range [0, {num_workers})")
                        if hosts[l, e, w]:
                            raise ValueError(f"worker {w} listed twice for expert {e} of layer {l}")
                        hosts[l, e, w] = True
                        fractions[l, e, w] = float(fraction)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed placement dict: {exc!r}") from exc
        return cls(hosts=hosts, fractions=fractions, slots_per_worker=spw)

    # -- helpers -----------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (
            self.slots_per_worker == other.slots_per_worker
            and self.hosts.shape == other.hosts.shape
            and bool(np.array_equal(self.hosts, other.hosts))
            and bool(np.array_equal(self.fractions, other.fractions))
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays; equality is by value

    def __repr__(self) -> str:
        return (
            f"Placement(layers={self.num_layers}, experts={self.num_experts}, "
            f"workers={self.num_workers}, slots_per_worker={self.slots_per_worker}, "
            f"replicas={self.num_replicas})"
        )

    def _check_index(self, layer: int, expert: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range [0, {self.num_experts})")

    def _check_load(self, load: Any) -> np.ndarray:
        arr = as_load(load)
        if arr.shape != (self.num_layers, self.num_experts):
            raise ValueError(
                f"load has shape {arr.shape}, expected [layers, experts] = "
                f"({self.num_layers}, {self.num_experts})"
            )
        return arr


def balancedness(placement: Placement, load: Any) -> np.ndarray:
    """Mean / max worker load per layer, ``[L]``; see :meth:`Placement.balancedness`."""
    return placement.balancedness(load)


def check_sizes(num_layers: int, num_experts: int, num_workers: int, slots_per_worker: int) -> None:
    """Raise ``ValueError`` unless the sizes are positive ints with room for every expert."""
    for name, value in (
        ("num_layers", num_layers),
        ("num_experts", num_experts),
        ("num_workers", num_workers),
        ("slots_per_worker", slots_per_worker),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_workers * slots_per_worker < num_experts:
        raise ValueError(
            f"not enough slots: {num_workers} workers x {slots_per_worker} slots per worker "
            f"= {num_workers * slots_per_worker} slots per layer, but {num_experts} experts "
            "need at least one replica each"
        )
