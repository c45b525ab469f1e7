"""Latency histograms: what lets interval results add up to exact episode percentiles.

Percentiles of intervals do not combine into the percentile of an episode; counts do. Each
interval's finished requests are counted (or weighted, for the aggregate model's fluid cohorts)
in fixed log-spaced bins, the bins are summed over any span of intervals, and a percentile is
read back by interpolating within its bin on the log scale.

The bins span 0.1 ms to 1000 s at 20 per decade (12.2% wide), so a percentile read back is
within 12.2% of the exact sample percentile; values outside the span land in the end bins.
"""

from __future__ import annotations

import math

import numpy as np

BINS_PER_DECADE = 20
LATENCY_EDGES_S = np.geomspace(1e-4, 1e3, 7 * BINS_PER_DECADE + 1)
"""Bin edges (s): bin k holds latencies in [edge k, edge k+1); the end bins also take what is
below the first edge or above the last."""

N_LATENCY_BINS = len(LATENCY_EDGES_S) - 1
_FIRST_EDGE_S = float(LATENCY_EDGES_S[0])
_LOG_FIRST_EDGE = math.log10(_FIRST_EDGE_S)


def empty_histogram() -> np.ndarray:
    """A histogram with no request in it."""
    return np.zeros(N_LATENCY_BINS)


def latency_histogram(values_s: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Count (or weigh) latencies into the fixed bins.

    Args:
        values_s: Latencies (s); NaNs are left out.
        weights: Per-value weight (default 1 each), e.g. the size of a fluid cohort.

    Returns:
        Per-bin totals, shape (N_LATENCY_BINS,).
    """
    v = np.asarray(values_s, dtype=float)
    w = np.ones(v.shape) if weights is None else np.asarray(weights, dtype=float)
    ok = np.isfinite(v)
    if np.count_nonzero(ok) != ok.size:
        v, w = v[ok], w[ok]
    # Geometric bins: the index is the scaled log (the simulator calls this every interval).
    pos = (np.log10(np.maximum(v, _FIRST_EDGE_S)) - _LOG_FIRST_EDGE) * BINS_PER_DECADE
    idx = np.minimum(pos.astype(np.int64), N_LATENCY_BINS - 1)
    return np.bincount(idx, weights=w, minlength=N_LATENCY_BINS)


def histogram_percentile(hist: np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0-100) of a histogram, interpolated within its bin (log scale).

    Returns:
        The latency (s); NaN for an empty histogram.

    Raises:
        ValueError: ``q`` outside [0, 100] or the histogram is not of the fixed bins.
    """
    h = np.asarray(hist, dtype=float)
    if h.shape != (N_LATENCY_BINS,):
        raise ValueError(f"histogram_percentile: want {N_LATENCY_BINS} bins, got shape {h.shape}")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"histogram_percentile: q must be in [0, 100], got {q!r}")
    total = float(h.sum())
    if total <= 0:
        return math.nan
    target = q / 100.0 * total
    cum = np.cumsum(h)
    k = min(int(np.searchsorted(cum, target, side="left")), N_LATENCY_BINS - 1)
    while h[k] <= 0 and k + 1 < N_LATENCY_BINS:  # q = 0: the first non-empty bin
        k += 1
    before = cum[k] - h[k]
    frac = min(max((target - before) / h[k], 0.0), 1.0)
    lo, hi = LATENCY_EDGES_S[k], LATENCY_EDGES_S[k + 1]
    return float(lo * (hi / lo) ** frac)
