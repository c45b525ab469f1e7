"""Request routing across SaaS instances: weighted water-filling on outstanding work.

Sending each new request to the instance with the least outstanding work relative to its weight
is the classic join-shortest-queue rule; water-filling does the same for a whole batch of
arrivals at once. The request-level model routes every tick's arrivals of every pool, so the
router is compiled (numba): a handful of loops over a few hundred instances, where whole-array
numpy paid a microsecond or two per operation for some sixty operations a tick. It computes
what the numpy formulation computed, bit for bit (whole-array sums in numpy's pairwise order,
`compiled.pairwise_sum`; stable sorts).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_cluster_gym.envs.sim.compiled import JIT_OPTIONS, pairwise_sum


@njit(**JIT_OPTIONS)
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
    s *= n_new / pairwise_sum(s)
    share[ok] = s
    return share


@njit(**JIT_OPTIONS)
def integer_split(share: np.ndarray, n: int) -> np.ndarray:
    """Round real shares to integers summing to `n` (largest remainders get the rest).

    The rest goes to the largest remainders, ties to the lower index (a stable sort of the
    remainders, descending); it is found by selection rather than a sort.
    """
    base = np.floor(share).astype(np.int64)
    rest = n - base.sum()
    if rest > 0:
        frac = share - base
        pos = np.flatnonzero(frac > 0)
        if rest <= len(pos):  # the largest remainders are all positive
            vals = frac[pos]
            v = np.partition(vals.copy(), len(vals) - rest)[len(vals) - rest]  # rest-th largest
            above = 0
            for i in pos:
                if frac[i] > v:
                    base[i] += 1
                    above += 1
            for i in pos:
                if above == rest:
                    break
                if frac[i] == v:
                    base[i] += 1
                    above += 1
        else:  # every positive remainder, then zero remainders in index order
            for i in pos:
                base[i] += 1
            rest -= len(pos)
            for i in range(len(frac)):
                if rest == 0:
                    break
                if frac[i] == 0:
                    base[i] += 1
                    rest -= 1
    elif rest < 0:
        base[np.argsort(-base, kind="mergesort")[:-rest]] -= 1
    return base


@njit(**JIT_OPTIONS)
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
        outstanding[took] += c
        # Round robin across the chosen instances, in instance order within each round.
        live = len(took)
        k = 0
        rnd = 0
        while live > 0:
            kept = 0
            for i in range(live):
                slot[members[k]] = took[i]
                k += 1
                if c[i] > rnd + 1:
                    took[kept] = took[i]
                    c[kept] = c[i]
                    kept += 1
            live = kept
            rnd += 1
