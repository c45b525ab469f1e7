"""What the serving models share: per-tick load for the power model, per-interval statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llm_cluster_gym.envs.latency import empty_histogram, latency_histogram
from llm_cluster_gym.envs.sim import latency_kernels


@dataclass
class TickLoad:
    """How busy each instance slot was during one tick (drives GPU power).

    Prefill is chunked into the decode steps (vLLM V1), so a mixed step's time is split: its
    prompt tokens' marginal time is prefill, its decode iteration is decode. The two busy times
    never add up to more than the tick.

    Attributes:
        prefill_busy_s: Seconds of the tick spent on prompt tokens: their marginal time in mixed
            steps, plus the whole pass (fixed cost included) of pure prefill steps.
        prefill_tokens: Mean prompt tokens per prefill-carrying step (sets prefill power draw).
        decode_busy_s: Seconds of the tick spent in decode iterations.
        decode_batch: Mean decode batch during those iterations (tokens per step).
        decode_ctx_tokens: Mean context of the decoding requests (sets, with the batch, decode
            power: `profiles.Profile.decode_power_load`).
        decode_tokens: Output tokens each slot's decode iterations produced in the tick (what
            throttling slows: `accounting.IntervalStats.add_tokens_lost`).
        tokens_generated: Output tokens produced in the tick (all slots).
        prefill_passes: Serial prefill only (``serving.prefill_mode: serial``): the tick's passes
            as (slot, prompt tokens of the pass, seconds of it run in this tick), so that power
            follows each pass at its own clock (`clocks.serial_prefill`) rather than a pass of the
            tick's mean prompt; None in chunked mode.
    """

    prefill_busy_s: np.ndarray
    prefill_tokens: np.ndarray
    decode_busy_s: np.ndarray
    decode_batch: np.ndarray
    decode_ctx_tokens: np.ndarray
    decode_tokens: np.ndarray
    tokens_generated: float = 0.0
    prefill_passes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class ServiceAccumulator:
    """Per-interval service counters, filled tick by tick and drained by the cluster."""

    n_pools: int
    arrived: int = 0
    finished: int = 0
    dropped: int = 0
    tokens: float = 0.0
    ttft_violations: int = 0
    tbt_violations: int = 0
    violations: int = 0
    quality_loss: float = 0.0
    ttft_s: list[np.ndarray] = field(default_factory=list)
    tbt_s: list[np.ndarray] = field(default_factory=list)
    weight: list[np.ndarray] = field(default_factory=list)
    arrivals_per_pool: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.arrivals_per_pool = np.zeros(self.n_pools)

    def record_finished(
        self,
        ttft_s: np.ndarray,
        tbt_s: np.ndarray,
        slo_ttft_s: np.ndarray,
        slo_tbt_s: np.ndarray,
        weight: np.ndarray | None = None,
        quality_loss: np.ndarray | None = None,
    ) -> None:
        """Count finished requests and their SLO outcomes (weights allow fluid cohorts)."""
        w = np.ones(len(ttft_s)) if weight is None else weight
        bad_ttft = ttft_s > slo_ttft_s
        bad_tbt = tbt_s > slo_tbt_s
        self.finished += float(w.sum())
        self.ttft_violations += float(w[bad_ttft].sum())
        self.tbt_violations += float(w[bad_tbt].sum())
        self.violations += float(w[bad_ttft | bad_tbt].sum())
        if quality_loss is not None:
            self.quality_loss += float((w * quality_loss).sum())
        if len(ttft_s):
            self.ttft_s.append(ttft_s)
            self.tbt_s.append(tbt_s)
            self.weight.append(w)

    def latency_stats(self) -> tuple[float, float, float, float, np.ndarray, np.ndarray]:
        """Latency of the requests finished this interval.

        Returns:
            TTFT P50/P99, TBT P50/P99 (0 if none finished), and the TTFT and TBT histograms
            (`envs.latency`).
        """
        if not self.ttft_s:
            return 0.0, 0.0, 0.0, 0.0, empty_histogram(), empty_histogram()
        one = len(self.weight) == 1  # the aggregate model's single cohort array per interval
        w = self.weight[0] if one else np.concatenate(self.weight)
        ttft = self.ttft_s[0] if one else np.concatenate(self.ttft_s)
        tbt = self.tbt_s[0] if one else np.concatenate(self.tbt_s)
        if len(w) <= latency_kernels.COMPILED_MAX_SAMPLES:  # the same figures, one call
            pct, ttft_hist, tbt_hist = latency_kernels.latency_summary(
                np.asarray(ttft, dtype=np.float64), np.asarray(tbt, dtype=np.float64),
                np.asarray(w, dtype=np.float64), _P50_P99)
            t50, t99, b50, b99 = pct.tolist()
            return t50, t99, b50, b99, ttft_hist, tbt_hist
        t50, t99 = weighted_percentiles(ttft, w, _P50_P99)
        b50, b99 = weighted_percentiles(tbt, w, _P50_P99)
        return t50, t99, b50, b99, latency_histogram(ttft, w), latency_histogram(tbt, w)


_P50_P99 = np.array([0.5, 0.99]) - 1e-12


def weighted_percentiles(
    values: np.ndarray, weight: np.ndarray, qs: tuple[float, ...] | np.ndarray
) -> tuple[float, ...]:
    """Percentiles of weighted samples (equal weights give the usual lower-median convention).

    `qs` are percentiles (0-100); an array is taken as fractions already shifted down by a hair
    (the hot path passes a precomputed one).
    """
    fractions = qs if isinstance(qs, np.ndarray) else np.asarray(qs) / 100.0 - 1e-12
    n = len(values)
    if n and np.count_nonzero(weight == 1.0) == n:
        # Unit weights (the request-level model: one per request): the cumulative weight is
        # 1, 2, ..., n, so the search lands on index ceil(q n) - 1 (within [0, n - 1]), and the
        # value there is the order statistic np.partition finds in linear time (NaNs last, as
        # in the sort): the same values as the general path below, without the sort.
        at = np.minimum(np.maximum(np.ceil(fractions * float(n)) - 1.0, 0.0), n - 1)
        at = at.astype(np.int64)
        return tuple(np.partition(values, at)[at].tolist())
    order = values.argsort(kind="stable")
    cum = weight[order].cumsum()
    total = cum[-1] if len(cum) else 0.0
    if total <= 0:
        return tuple(0.0 for _ in qs)
    # Zero-weight samples add nothing to the cumulative weight, so the search never stops on one
    # unless it ties a positive one before it.
    idx = cum.searchsorted(fractions * total)
    return tuple(values[order[np.minimum(idx, len(values) - 1)]].tolist())
