"""An interval's latency summary in one compiled call: two weighted percentiles and a histogram.

`serving.ServiceAccumulator.latency_stats` asks every interval for the TTFT and TBT P50 and
P99 of the requests finished (`serving.weighted_percentiles`) and their histograms
(`envs.latency.latency_histogram`). On the aggregate model that is a few dozen fluid cohorts,
where numpy's per-call cost is most of the time; this loop gives the same figures bit for bit
(a stable sort, a running sum and a left search, as numpy's; ``log10`` is the C library's, as on
numpy's baseline loops, `tests/golden/canonical_cpu.py`). Large samples (the request-level
model's thousands of requests) stay with numpy, whose sort is the faster one there.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from llm_cluster_gym.envs.latency import BINS_PER_DECADE, LATENCY_EDGES_S, N_LATENCY_BINS
from llm_cluster_gym.envs.sim.compiled import JIT_OPTIONS

COMPILED_MAX_SAMPLES = 1024
"""Samples up to which `latency_stats` uses this loop (above it numpy's sort is faster)."""

_FIRST_EDGE_S = float(LATENCY_EDGES_S[0])
_LOG_FIRST_EDGE = math.log10(_FIRST_EDGE_S)


@njit(**JIT_OPTIONS)
def _percentiles(values, weight, fractions, out, at):
    """`serving.weighted_percentiles` of `values` at `fractions`, written to ``out[at:]``."""
    n = len(values)
    order = np.argsort(values, kind="mergesort")
    cum = np.empty(n)
    running = 0.0
    for j in range(n):
        running += weight[order[j]]
        cum[j] = running
    total = cum[n - 1] if n else 0.0
    for q in range(len(fractions)):
        if total <= 0:
            out[at + q] = 0.0
            continue
        k = np.searchsorted(cum, fractions[q] * total)
        out[at + q] = values[order[min(k, n - 1)]]


@njit(**JIT_OPTIONS)
def _histogram(values, weight):
    """`envs.latency.latency_histogram` (NaNs and infinities left out)."""
    hist = np.zeros(N_LATENCY_BINS)
    for j in range(len(values)):
        v = values[j]
        if not math.isfinite(v):
            continue
        pos = (math.log10(max(v, _FIRST_EDGE_S)) - _LOG_FIRST_EDGE) * BINS_PER_DECADE
        hist[min(int(pos), N_LATENCY_BINS - 1)] += weight[j]
    return hist


@njit(**JIT_OPTIONS)
def latency_summary(ttft_s, tbt_s, weight, fractions):
    """(TTFT then TBT percentiles at `fractions`, TTFT histogram, TBT histogram)."""
    k = len(fractions)
    pct = np.empty(2 * k)
    _percentiles(ttft_s, weight, fractions, pct, 0)
    _percentiles(tbt_s, weight, fractions, pct, k)
    return pct, _histogram(ttft_s, weight), _histogram(tbt_s, weight)
