"""Request routing across SaaS instances: weighted water-filling on outstanding work.

Sending each new request to the instance with the least outstanding work relative to its weight
is the classic join-shortest-queue rule; water-filling does the same for a whole batch of
arrivals at once. The request-level model routes every tick's arrivals of every pool, so the
router is compiled (numba): a handful of loops over a few hundred instances, where whole-array
numpy paid a microsecond or two per operation for some sixty operations a tick. It computes
what the numpy formulation computed, bit for bit (sums in numpy's pairwise order, stable sorts).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(**_JIT)
def _block_sum(a: np.ndarray, lo: int, n: int) -> float:
    """Sum of a block of at most 128 values in numpy's order (in sequence below 8, else 8-way)."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    stop = n - (n % 8)
    while i < stop:
        b = lo + i
        r0 += a[b]
        r1 += a[b + 1]
        r2 += a[b + 2]
        r3 += a[b + 3]
        r4 += a[b + 4]
        r5 += a[b + 5]
        r6 += a[b + 6]
        r7 += a[b + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(**_JIT)
def _pairwise_sum(a: np.ndarray) -> float:
    """Sum of `a` in numpy's order, so that a renormalisation matches ``ndarray.sum`` bit for bit.

    numpy sums a contiguous float64 array pairwise: blocks of up to 128 values (`_block_sum`),
    and above that the two halves (split at a multiple of 8) summed apart and added. The halving
    runs on an explicit stack: numba's on-disk cache does not load recursive functions safely.
    """
    n = len(a)
    if n <= 128:
        return _block_sum(a, 0, n)
    depth = 64  # halving from 2**63 values
    f_lo = np.empty(depth, np.int64)
    f_n = np.empty(depth, np.int64)
    f_stage = np.zeros(depth, np.int64)  # 0: descend left, 1: left summed, 2: right summed
    f_left = np.empty(depth)
    sp = 0
    f_lo[0], f_n[0] = 0, n
    ret = 0.0
    while sp >= 0:
        lo, m = f_lo[sp], f_n[sp]
        if m <= 128:
            ret = _block_sum(a, lo, m)
            sp -= 1
            continue
        half = m // 2
        half -= half % 8
        if f_stage[sp] == 0:
            f_stage[sp] = 1
            sp += 1
            f_lo[sp], f_n[sp], f_stage[sp] = lo, half, 0
        elif f_stage[sp] == 1:
            f_left[sp] = ret
            f_stage[sp] = 2
            sp += 1
            f_lo[sp], f_n[sp], f_stage[sp] = lo + half, m - half, 0
        else:
            ret = f_left[sp] + ret
            sp -= 1
    return ret


@njit(**_JIT)
def water_fill(outstanding: np.ndarray, weight: np.ndarray, n_new: float) -> np.ndarray:
    """Split `n_new` units over candidates so that (outstanding + share) / weight is levelled.

    Args:
        outstanding: Work already queued or running on each candidate (>= 0).
        weight: Relative capacity of each candidate (> 0 to receive work).
        n_new: Amount of new work to place.

    Returns:
        Real-valued shares (>= 0) summing to `n_new` (all zeros when no candidate has weight).
    """
    share = np.zeros(len(outstanding))
    ok = np.flatnonzero(weight > 0)
    if n_new <= 0 or len(ok) == 0:
        return share
    o, w = outstanding[ok], weight[ok]
    level_at = o / w
    order = np.argsort(level_at, kind="mergesort")  # stable
    lv, ws, os_ = level_at[order], w[order], o[order]
    cum_w, cum_o = np.cumsum(ws), np.cumsum(os_)
    # Filling up to level lv[j] with the first j+1 candidates places cum_w*lv - cum_o units.
    placed_at = cum_w * lv - cum_o
    j = max(np.searchsorted(placed_at, n_new, side="right") - 1, 0)
    level = (n_new + cum_o[j]) / cum_w[j]
    s = np.maximum(level * w - o, 0.0)
    s *= n_new / _pairwise_sum(s)
    share[ok] = s
    return share


@njit(**_JIT)
def integer_split(share: np.ndarray, n: int) -> np.ndarray:
    """Round real shares to integers summing to `n` (largest remainders get the rest)."""
    base = np.floor(share).astype(np.int64)
    rest = n - base.sum()
    if rest > 0:
        frac = share - base
        pos = np.flatnonzero(frac > 0)
        if rest <= len(pos):  # the largest remainders are all positive: sort only those
            base[pos[np.argsort(-frac[pos], kind="mergesort")[:rest]]] += 1
        else:
            base[np.argsort(-frac, kind="mergesort")[:rest]] += 1
    elif rest < 0:
        base[np.argsort(-base, kind="mergesort")[:-rest]] -= 1
    return base


@njit(**_JIT)
def route_arrivals(slot: np.ndarray, pool: np.ndarray, unrouted: np.ndarray,
                   outstanding: np.ndarray, weight: np.ndarray, capacity: np.ndarray,
                   inst_pool: np.ndarray) -> None:
    """Give every unrouted request an instance slot, pool by pool (writes `slot` in place).

    A pool's requests are water-filled over its instances by routing weight (`weight`: zero
    where an instance does not serve); a pool with no such instance spills over every preferred
    live instance, and where every preferred row is empty the weights yield to plain capacity
    (`capacity`), the pool's instances first. Consecutive arrivals alternate across the chosen
    instances (round robin), and each pool's placements count as outstanding work for the next.
    """
    pools = pool[unrouted]
    n_pools = pools.max() + 1
    present = np.zeros(n_pools, dtype=np.bool_)
    for p in pools:
        present[p] = True
    for p in range(n_pools):
        if not present[p]:
            continue
        members = unrouted[pools == p]
        in_pool = inst_pool == p
        cand = weight * in_pool  # the pool's instances, by routing preference
        if not (cand > 0).any():
            cand = weight  # no instance serves this pool: any preferred live instance takes it
            if not (cand > 0).any():  # every preferred row is empty: weights yield
                cand = capacity * in_pool
                if not (cand > 0).any():
                    cand = capacity
        counts = integer_split(water_fill(outstanding, cand, float(len(members))), len(members))
        took = np.flatnonzero(counts)
        c = counts[took]
        # Round-robin order across instances: sort the assignments by their position within
        # their instance (stable, so instances keep their order within a round).
        target = np.repeat(took, c)
        position = np.arange(len(target)) - np.repeat(np.cumsum(c) - c, c)
        slot[members] = target[np.argsort(position, kind="mergesort")]
        outstanding[took] += c
