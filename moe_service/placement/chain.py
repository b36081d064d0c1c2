"""Wrap-around packing with split experts (McNaughton-style chain).

Workers are filled one after another up to a token capacity. Each worker takes
as many small experts as it can while its remaining slots can still bring it up
to capacity with the biggest experts; the last big expert on a worker is split
and its remainder carried to the next worker. Split experts link neighbouring
workers, so the later split refinement can still shift load along the chain.
"""

from __future__ import annotations

import numpy as np

# Capacities tried, as multiples of the mean worker load, until one fits.
_SLACKS = (1.0, 1.0025, 1.005, 1.01, 1.015, 1.02, 1.03, 1.05, 1.08, 1.12, 1.2, 1.35, 1.6, 2.0)

Piece = tuple[int, int, float]  # (expert, worker, tokens)


def chain_pieces(
    load_row: np.ndarray, num_workers: int, slots_per_worker: int, capacity: float
) -> list[Piece] | None:
    """Pieces for one layer's ``[E]`` load, or ``None`` if ``capacity`` is too small.

    Every expert appears in at least one piece, on distinct workers; no worker
    gets more than ``slots_per_worker`` pieces or more than ``capacity`` tokens.
    """
    order = np.argsort(load_row, kind="stable")
    vals = load_row[order].tolist()
    order = order.tolist()
    prefix = np.concatenate(([0.0], np.cumsum(load_row[np.asarray(order)]))).tolist()
    eps = 1e-12 * capacity
    lo, hi = 0, len(vals) - 1  # remaining experts are order[lo..hi], ascending load
    carry, rest = -1, 0.0  # expert split off the previous worker, tokens still to place
    pieces: list[Piece] = []
    for worker in range(num_workers):
        slots, room = slots_per_worker, capacity
        if carry >= 0:
            slots -= 1
            if rest >= room - eps:
                # The carried expert outlasts this worker: spend the other slots
                # on small experts and let the carry take whatever room is left.
                while slots > 0 and lo <= hi and vals[lo] <= room:
                    pieces.append((order[lo], worker, vals[lo]))
                    room -= vals[lo]
                    lo += 1
                    slots -= 1
                if room > eps:
                    pieces.append((carry, worker, room))
                    rest -= room
                if rest <= eps:
                    carry = -1
                continue
            pieces.append((carry, worker, rest))
            room -= rest
            carry = -1
        if slots == 0 or lo > hi:
            continue
        smalls = _smalls_leaving_room(prefix, lo, hi, slots, room, eps)
        for _ in range(smalls):
            pieces.append((order[lo], worker, vals[lo]))
            room -= vals[lo]
            lo += 1
            slots -= 1
        while slots > 0 and lo <= hi and room > eps:
            take = min(vals[hi], room)
            pieces.append((order[hi], worker, take))
            room -= take
            slots -= 1
            if vals[hi] - take > eps:
                carry, rest = order[hi], vals[hi] - take
            hi -= 1
    if lo <= hi or carry >= 0:
        return None
    return pieces


def _smalls_leaving_room(
    prefix: list[float], lo: int, hi: int, slots: int, room: float, eps: float
) -> int:
    """Most small experts a worker can take while its other slots, given to the
    biggest experts, can still fill ``room``. 0 if even all-big cannot fill it."""
    remaining = hi - lo + 1
    best = 0
    for m in range(1, min(slots, remaining) + 1):
        small = prefix[lo + m] - prefix[lo]
        if small > room + eps:
            break
        bigs = min(slots - m, remaining - m)
        big = prefix[hi + 1] - prefix[hi + 1 - bigs]
        if small + big < room - eps:
            break
        best = m
    return best


def chain_layer(
    load_row: np.ndarray, num_workers: int, slots_per_worker: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hosts ``[E, W]`` bool and fractions ``[E, W]`` for one layer's ``[E]`` load.

    Uses the smallest capacity (from a fixed ladder above the mean worker load)
    at which the chain fits; the final rung always fits since ``W * slots >= E``.
    """
    num_experts = load_row.size
    mean = float(load_row.sum()) / num_workers
    pieces = None
    for slack in _SLACKS:
        pieces = chain_pieces(load_row, num_workers, slots_per_worker, mean * slack)
        if pieces is not None:
            break
    if pieces is None:
        # Capacity of a whole layer per worker: each worker simply takes
        # ``slots_per_worker`` experts whole, which fits because W*slots >= E.
        pieces = chain_pieces(load_row, num_workers, slots_per_worker, 2.0 * float(load_row.sum()) + 1.0)
        assert pieces is not None
    hosts = np.zeros((num_experts, num_workers), dtype=bool)
    tokens = np.zeros((num_experts, num_workers))
    for expert, worker, amount in pieces:
        hosts[expert, worker] = True
        tokens[expert, worker] += amount
    totals = tokens.sum(axis=1, keepdims=True)
    # Zero-load experts sit in one piece; give it the whole (empty) share.
    fractions = np.where(totals > 0, tokens / np.where(totals > 0, totals, 1.0), hosts)
    return hosts, fractions


def chain_hosts(
    load: np.ndarray, num_workers: int, slots_per_worker: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`chain_layer` for every layer of ``load`` ``[L, E]``: ``[L, E, W]`` twice."""
    pairs = [chain_layer(row, num_workers, slots_per_worker) for row in load]
    return np.stack([h for h, _ in pairs]), np.stack([f for _, f in pairs])
