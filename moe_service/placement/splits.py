"""Token split fractions for replicated experts (water-filling).

Given which workers host which experts, choose for every replicated expert the
fraction of its tokens each replica serves so that the busiest worker is as
light as possible. Block coordinate descent: each step re-splits one expert's
tokens over its replicas so as to level the loads of the workers hosting it
(water-filling), with the other experts held fixed. Each step minimises the sum
of squared worker loads over that block, so the sweeps converge to the
minimum-norm load vector; the reachable load vectors form a polymatroid base
polytope, whose minimum-norm point also minimises the maximum (Fujishige).

Experts whose replicas share no worker are independent blocks, so each sweep
updates one colour class of a greedy colouring at a time, for all layers at
once, rather than one expert at a time. Steps are over-relaxed, which keeps
the optimum a fixed point but converges much faster on long chains of experts.
"""

from __future__ import annotations

import numpy as np

_OMEGA = 1.6  # over-relaxation factor of the descent, in [1, 2)


def equal_fractions(hosts: np.ndarray) -> np.ndarray:
    """Equal split over each expert's replicas: ``hosts`` ``[L, E, W]`` bool -> float."""
    counts = hosts.sum(axis=-1, keepdims=True)
    return hosts / np.maximum(counts, 1)


def optimal_fractions(
    load: np.ndarray,
    hosts: np.ndarray,
    init: np.ndarray | None = None,
    *,
    max_sweeps: int = 400,
    tol: float = 1e-5,
    good_enough: float = 1.0,
) -> np.ndarray:
    """Fractions ``[L, E, W]`` (approximately) minimising each layer's max worker load.

    ``load`` is ``[L, E]``, ``hosts`` ``[L, E, W]`` bool (every expert hosted at
    least once). ``init`` (``[L, E, W]``, e.g. the previous plan's fractions)
    warm-starts the descent; rows that are not a valid split of ``hosts`` are
    reset to an equal split. Returned rows are zero off ``hosts`` and sum to 1.
    Stops when no worker load moves by more than ``tol`` times the layer's mean
    worker load during a sweep, when every layer's balancedness (mean / max
    worker load) is at least ``good_enough``, or after ``max_sweeps`` sweeps.
    """
    num_layers, _, num_workers = hosts.shape
    counts = hosts.sum(axis=-1)  # [L, E]
    fractions = equal_fractions(hosts)
    if init is not None:
        warm = np.where(hosts, np.clip(init, 0.0, None), 0.0)
        ok = np.abs(warm.sum(axis=-1) - 1.0) < 1e-6  # [L, E]
        fractions[ok] = warm[ok]
    lay, exp = np.nonzero(counts >= 2)  # the experts with a choice to make
    if lay.size == 0:
        return fractions

    # Blocks 0..N-1 are the replicated experts; block N is padding.
    n = lay.size
    dummy = num_workers  # padding worker column, loaded far above any real worker
    r_max = int(counts[lay, exp].max())
    order = np.argsort(~hosts[lay, exp], axis=-1, kind="stable")[:, :r_max]
    valid = np.arange(r_max)[None, :] < counts[lay, exp][:, None]
    idx = np.full((n + 1, r_max), dummy, dtype=np.int64)
    idx[:n] = np.where(valid, order, dummy)
    tokens = np.zeros(n + 1)
    tokens[:n] = load[lay, exp]
    frac = np.zeros((n + 1, r_max))
    frac[:n] = np.take_along_axis(fractions[lay, exp], np.minimum(idx[:n], num_workers - 1), axis=-1)
    frac[:n] *= valid

    loads = np.empty((num_layers, num_workers + 1))
    loads[:, :num_workers] = np.einsum("le,lew->lw", load, fractions)
    # Finite stand-in for infinity: water never reaches it, and unlike inf it
    # keeps the arithmetic below fast and NaN-free.
    loads[:, dummy] = 1e200
    flat = loads.reshape(-1)
    scale = np.maximum(load.sum(axis=1) / num_workers, 1e-300)  # [L] mean worker load
    steps = np.arange(1, r_max + 1)

    # Per group: blocks [L, M], flat load index [L, M, R'], tokens, 1/tokens,
    # has-tokens mask, fractions [L, M, R'], with R' the group's padded width.
    groups = []
    layer_base = (np.arange(num_layers) * (num_workers + 1))[:, None, None]
    width = np.minimum(2 ** np.ceil(np.log2(counts[lay, exp])).astype(np.int64), r_max)
    width_of = np.append(width, 1)
    for group in _colour_groups(lay, idx[:n], width, num_layers, n, dummy):
        cols = int(width_of[group].max())
        tok = tokens[group][..., None]
        inv = np.divide(1.0, tok, out=np.zeros_like(tok), where=tok > 0)
        groups.append((group, layer_base + idx[group][..., :cols], tok, inv, tok > 0, frac[group][..., :cols]))

    for _ in range(max_sweeps):
        before = loads[:, :num_workers].copy()
        for i, (group, where, tok, inv, busy, part) in enumerate(groups):
            base = flat[where] - tok * part  # padding stays ~1e200
            low = np.sort(base, axis=-1)
            # Pouring the tokens over the j lowest workers would level them at
            # (tokens + their loads) / j; that falls while the next worker is
            # below it and rises after, so the true water level is the minimum.
            levels = (tok + np.cumsum(low, axis=-1)) / steps[: low.shape[-1]]
            level = levels.min(axis=-1, keepdims=True)
            new = np.maximum(level - base, 0.0)
            # Over-relax: step past the block optimum (then clip and rescale
            # back onto the expert's token budget). The optimum is still a
            # fixed point, and long chains of experts, on which plain
            # Gauss-Seidel crawls, take several times fewer sweeps.
            old = tok * part
            new = np.maximum(old + _OMEGA * (new - old), 0.0)
            new *= tok / np.maximum(new.sum(axis=-1, keepdims=True), 1e-300)
            flat[where] = base + new
            # Zero-token experts keep their split; the choice is immaterial.
            groups[i] = (group, where, tok, inv, busy, np.where(busy, new * inv, part))
        current = loads[:, :num_workers]
        moved = np.abs(current - before).max(axis=1) / scale
        if moved.max() <= tol:
            break
        if good_enough < 1.0 and (current.max(axis=1) * good_enough <= scale).all():
            break

    for group, _, _, _, _, part in groups:
        frac[group, : part.shape[-1]] = part
    real = idx[:n] != dummy
    out = np.where(real, np.clip(frac[:n], 0.0, None), 0.0)
    out /= np.maximum(out.sum(axis=-1, keepdims=True), 1e-300)
    # Scatter back through the padding column, which only collects zeros.
    full = np.zeros((n, num_workers + 1))
    np.put_along_axis(full, idx[:n], out, axis=-1)
    fractions[lay, exp] = full[:, :num_workers]
    return fractions


def _colour_groups(
    lay: np.ndarray, idx: np.ndarray, width: np.ndarray, num_layers: int, pad_block: int, pad_worker: int
) -> list[np.ndarray]:
    """Blocks grouped for simultaneous update: within a group, blocks of one
    layer share no worker (greedy colouring) and have similar replica counts
    (``width`` ``[N]``, a power of two at least the count, bounds each group's
    padding). ``lay`` ``[N]`` (ascending) and ``idx`` ``[N, R]`` give each
    block's layer and workers. Returns per group a ``[L, M]`` array of block
    ids, padded with ``pad_block``."""
    colour = np.empty(lay.size, dtype=np.int64)
    busy: dict[tuple[int, int], int] = {}  # (layer, colour) -> bitmask of workers
    for block, (layer, row) in enumerate(zip(lay.tolist(), idx.tolist())):
        mask = sum(1 << w for w in row if w != pad_worker)
        c = 0
        while busy.get((layer, c), 0) & mask:
            c += 1
        busy[(layer, c)] = busy.get((layer, c), 0) | mask
        colour[block] = c
    groups = []
    for c in range(int(colour.max()) + 1):
        for w in np.unique(width[colour == c]):
            blocks = np.flatnonzero((colour == c) & (width == w))
            layer_of = lay[blocks]
            size = int(np.bincount(layer_of, minlength=num_layers).max())
            group = np.full((num_layers, size), pad_block, dtype=np.int64)
            # Position of each block among its layer's blocks in this group.
            pos = np.arange(blocks.size) - np.searchsorted(layer_of, layer_of)
            group[layer_of, pos] = blocks
            groups.append(group)
    return groups
