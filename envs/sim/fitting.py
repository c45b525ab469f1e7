"""Fitting helpers shared by the profile builder and the sim-to-real calibration."""

from __future__ import annotations

import itertools

import numpy as np


def nonneg_rel_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of relative error with non-negative coefficients (exhaustive active set).

    Timing models are sums of non-negative terms, and their data spans orders of magnitude, so
    the fit minimizes relative error over every subset of columns whose unconstrained solution
    is non-negative (a handful of columns: exhaustive search is exact and cheap).
    """
    n = x.shape[1]
    w = 1.0 / y
    best, best_cost = np.zeros(n), np.inf
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            c, *_ = np.linalg.lstsq(x[:, cols] * w[:, None], y * w, rcond=None)
            if np.any(c < 0):
                continue
            coef = np.zeros(n)
            coef[list(cols)] = c
            cost = float(np.sum(((x @ coef - y) * w) ** 2))
            if cost < best_cost:
                best, best_cost = coef, cost
    return best


def saturation_fit(load: np.ndarray, f_rel_g: np.ndarray, power_w: np.ndarray, idle_w: float,
                   n_grid: int = 2001) -> tuple[float, float]:
    """Max power and half-load k of ``idle + (max - idle) * x/(x+k) * f_rel**g`` (LS in W).

    For each k on a log grid (1e-2..1e6, ``n_grid`` points) the best amplitude is linear
    least squares; the k with the least squared error in watts is kept.
    """
    y = power_w - idle_w
    best = (np.inf, 0.0, 1.0)
    for k in np.logspace(-2, 6, n_grid):
        g = load / (load + k) * f_rel_g
        a = float(g @ y / (g @ g))
        sse = float(np.sum((a * g - y) ** 2))
        if sse < best[0]:
            best = (sse, a, float(k))
    return idle_w + best[1], best[2]


def relative_error_stats(pred: np.ndarray, obs: np.ndarray) -> dict[str, float]:
    """MAPE and max absolute percentage error of a fit (percent), and the point count."""
    rel = np.abs(pred - obs) / obs * 100.0
    return {"mape_pct": round(float(rel.mean()), 3), "max_abs_pct": round(float(rel.max()), 3),
            "n": int(obs.size)}
