"""Latency histograms: episode percentiles from per-interval counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_cluster_gym.envs.latency import (
    LATENCY_EDGES_S,
    N_LATENCY_BINS,
    histogram_percentile,
    latency_histogram,
)

BIN_RATIO = LATENCY_EDGES_S[1] / LATENCY_EDGES_S[0]


def test_percentiles_read_back_within_one_bin():
    rng = np.random.default_rng(0)
    x = rng.lognormal(mean=-1.0, sigma=1.2, size=20_000)  # TTFT-like: 10 ms .. 10 s
    h = latency_histogram(x)
    assert h.sum() == len(x)
    for q in (1, 50, 90, 99, 99.9):
        exact = float(np.percentile(x, q))
        got = histogram_percentile(h, q)
        assert exact / BIN_RATIO <= got <= exact * BIN_RATIO, q


def test_histograms_add_up_over_intervals():
    """Summed interval histograms give the percentile of all requests, unlike interval P99s."""
    rng = np.random.default_rng(1)
    calm = [rng.lognormal(-3.0, 0.3, 200) for _ in range(99)]
    spike = rng.lognormal(1.0, 0.3, 200)  # one bad interval
    intervals = [*calm, spike]
    total = np.sum([latency_histogram(v) for v in intervals], axis=0)
    np.testing.assert_array_equal(total, latency_histogram(np.concatenate(intervals)))
    exact = float(np.percentile(np.concatenate(intervals), 99))
    got = histogram_percentile(total, 99)
    assert exact / BIN_RATIO <= got <= exact * BIN_RATIO
    worst_interval_p99 = max(float(np.percentile(v, 99)) for v in intervals)
    assert worst_interval_p99 > 3 * got  # the worst interval is not the episode


def test_weights_nan_and_ends():
    h = latency_histogram(np.array([0.01, np.nan, 0.01, 1e-9, 1e9]), np.array([2.0, 5.0, 1.0, 1.0, 1.0]))
    assert h.sum() == 5.0  # the NaN is left out, its weight too
    assert h[0] == 1.0 and h[-1] == 1.0  # out-of-range values land in the end bins
    assert histogram_percentile(h, 0) >= LATENCY_EDGES_S[0]
    assert math.isnan(histogram_percentile(np.zeros(N_LATENCY_BINS), 50))


@pytest.mark.parametrize("q", [-1.0, 100.5, float("nan")])
def test_bad_percentile_is_named(q):
    with pytest.raises(ValueError, match="q must be"):
        histogram_percentile(np.ones(N_LATENCY_BINS), q)
    with pytest.raises(ValueError, match="bins"):
        histogram_percentile(np.ones(3), 50)
