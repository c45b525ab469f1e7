"""Least-squares helpers shared by the profile builder and the sim-to-real calibration."""

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
