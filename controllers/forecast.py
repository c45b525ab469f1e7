"""Load forecasting for the energy manager: Holt's linear smoothing plus a recent peak.

DynamoLLM sizes instances for the load expected over the next reconfiguration window and
sets frequencies for the next interval; both need a forecast that reacts to ramps without
chasing noise. Holt's method (level + trend) does that; the recent maximum guards against
bursts the smoothing hides.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class LoadForecaster:
    """Per-pool arrival-rate forecaster.

    Args:
        prior_rps: Expected rate per pool before anything is observed (request history).
        alpha: Level smoothing weight.
        beta: Trend smoothing weight.
        window: Intervals of history kept for the recent peak.
    """

    def __init__(self, prior_rps: np.ndarray, alpha: float = 0.5, beta: float = 0.2,
                 window: int = 12) -> None:
        if not (0 < alpha <= 1 and 0 <= beta <= 1 and window >= 1):
            raise ValueError(f"LoadForecaster: need 0<alpha<=1, 0<=beta<=1, window>=1; got "
                             f"alpha={alpha}, beta={beta}, window={window}")
        self.prior = np.asarray(prior_rps, dtype=float).copy()
        self.alpha, self.beta, self.window = alpha, beta, window
        self.reset()

    def reset(self) -> None:
        """Forget the history (start from the prior)."""
        self.level = self.prior.copy()
        self.trend = np.zeros_like(self.prior)
        self.history: deque[np.ndarray] = deque(maxlen=self.window)
        self.n_seen = 0

    def update(self, rate_rps: np.ndarray) -> None:
        """Add one interval's observed rate per pool."""
        x = np.asarray(rate_rps, dtype=float)
        if self.n_seen == 0:
            self.level = x.copy()
        else:
            prev = self.level
            self.level = self.alpha * x + (1 - self.alpha) * (self.level + self.trend)
            self.trend = self.beta * (self.level - prev) + (1 - self.beta) * self.trend
        self.history.append(x)
        self.n_seen += 1

    def forecast(self, horizon: int = 1) -> np.ndarray:
        """Expected rate ``horizon`` intervals ahead (>= 0)."""
        return np.maximum(self.level + horizon * self.trend, 0.0)

    def peak(self, horizon: int) -> np.ndarray:
        """Rate to provision for over the next ``horizon`` intervals.

        The larger of the recent maximum and the trend forecast at the horizon (the prior
        until data arrives).
        """
        if not self.history:
            return self.prior.copy()
        recent = np.max(np.stack(self.history), axis=0)
        return np.maximum(recent, self.forecast(horizon))


class BatchedLoadForecaster:
    """`LoadForecaster` for N independent copies at once: arrays (copies, pools).

    Each copy's level, trend and recent peak follow exactly what its own `LoadForecaster` would
    compute from the same observations (the same operations element by element; the history is
    a ring of the last ``window`` rates, -inf where a copy has seen fewer).

    Args:
        prior_rps: Expected rate per pool before anything is observed (the same for every copy).
        n_copies: N.
        alpha, beta, window: As `LoadForecaster`.
    """

    def __init__(self, prior_rps: np.ndarray, n_copies: int, alpha: float = 0.5, beta: float = 0.2,
                 window: int = 12) -> None:
        LoadForecaster(prior_rps, alpha, beta, window)  # the same argument checks
        self.prior = np.asarray(prior_rps, dtype=float).copy()
        self.alpha, self.beta, self.window = alpha, beta, window
        n, p = int(n_copies), self.prior.size
        self.level = np.tile(self.prior, (n, 1))
        self.trend = np.zeros((n, p))
        self.history = np.full((n, window, p), -np.inf)
        self.n_seen = np.zeros(n, dtype=np.int64)

    def reset(self, copies: np.ndarray | None = None) -> None:
        """Forget the history of ``copies`` (a boolean mask; None: every copy)."""
        c = slice(None) if copies is None else np.asarray(copies, dtype=bool)
        self.level[c] = self.prior
        self.trend[c] = 0.0
        self.history[c] = -np.inf
        self.n_seen[c] = 0

    def update(self, rate_rps: np.ndarray, copies: np.ndarray) -> None:
        """Add one interval's observed rate (copies, pools) for the copies in the boolean mask."""
        x = np.asarray(rate_rps, dtype=float)
        first = copies & (self.n_seen == 0)
        later = copies & (self.n_seen > 0)
        level = self.level
        new_level = np.where(first[:, None], x, level)
        smoothed = self.alpha * x + (1 - self.alpha) * (level + self.trend)
        new_level = np.where(later[:, None], smoothed, new_level)
        new_trend = self.beta * (new_level - level) + (1 - self.beta) * self.trend
        self.trend = np.where(later[:, None], new_trend, self.trend)
        self.level = new_level
        slot = self.n_seen % self.window
        rows = np.flatnonzero(copies)
        self.history[rows, slot[rows]] = x[rows]
        self.n_seen = self.n_seen + copies

    def forecast(self, horizon: int = 1) -> np.ndarray:
        """Expected rate ``horizon`` intervals ahead per copy and pool (>= 0)."""
        return np.maximum(self.level + horizon * self.trend, 0.0)

    def peak(self, horizon: int) -> np.ndarray:
        """Per copy, `LoadForecaster.peak`: the prior until a copy has seen a rate."""
        recent = self.history.max(axis=1)
        return np.where((self.n_seen > 0)[:, None], np.maximum(recent, self.forecast(horizon)),
                        self.prior)
