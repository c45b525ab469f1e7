"""Request routing across SaaS instances: weighted water-filling on outstanding work.

Sending each new request to the instance with the least outstanding work relative to its weight
is the classic join-shortest-queue rule; water-filling does the same for a whole batch of
arrivals at once, which keeps the hot path vectorized.
"""

from __future__ import annotations

import numpy as np


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
    ok = weight > 0
    if n_new <= 0 or not ok.any():
        return share
    o, w = outstanding[ok], weight[ok]
    level_at = o / w
    order = np.argsort(level_at, kind="stable")
    lv, ws, os_ = level_at[order], w[order], o[order]
    cum_w, cum_o = np.cumsum(ws), np.cumsum(os_)
    # Filling up to level lv[j] with the first j+1 candidates places cum_w*lv - cum_o units.
    placed_at = cum_w * lv - cum_o
    j = int(np.searchsorted(placed_at, n_new, side="right")) - 1
    j = max(j, 0)
    level = (n_new + cum_o[j]) / cum_w[j]
    s = np.maximum(level * w - o, 0.0)
    s *= n_new / s.sum()
    share[np.flatnonzero(ok)] = s
    return share


def integer_split(share: np.ndarray, n: int) -> np.ndarray:
    """Round real shares to integers summing to `n` (largest remainders get the rest)."""
    base = np.floor(share).astype(np.int64)
    rest = n - int(base.sum())
    if rest > 0:
        frac = share - base
        pos = np.flatnonzero(frac > 0)
        if rest <= len(pos):  # the largest remainders are all positive: sort only those
            base[pos[np.argsort(-frac[pos], kind="stable")[:rest]]] += 1
        else:
            base[np.argsort(-frac, kind="stable")[:rest]] += 1
    elif rest < 0:
        base[np.argsort(-base, kind="stable")[: -rest]] -= 1
    return base
