"""The aggregate serving model for N independent copies of one cluster, stepped as arrays.

`BatchedAggregateServing` is `AggregateServing` over the slots of N copies laid end to end (copy
``e`` owns slots ``e*S .. (e+1)*S - 1`` and pools ``e*P .. (e+1)*P - 1``): every per-slot and
per-pool formula is the single model's, unchanged; what couples slots across a cluster is done
per copy here:

* routing: each copy's router splits its own pools' buffers over its own live instances; the
  fallbacks (no routing weight anywhere: route by batch cap; a pool without instances: spill
  over every live instance) and "no request or no live instance: keep the buffer" are decided
  per copy;
* the interval's counters (arrived, finished, dropped, violations, tokens) are kept per copy
  (`BatchedAccumulator`), and the finishing cohort's latency samples stay dense (copy, slot)
  arrays so that each copy's percentiles are one vectorized pass;
* a copy none of whose instances had work in a tick ages all its queues, as the single model's
  early return does.

Each copy's figures equal those of its own `AggregateServing` up to the order of floating-point
sums (tests compare them). Only pool-level SLOs (no `serving.slo_classes`).
"""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.serving_aggregate import AggregateServing

_P50_P99 = np.array([0.5, 0.99]) - 1e-12
"""As `serving.weighted_percentiles`' hot path: fractions shifted down by a hair."""


class BatchedAccumulator:
    """One control interval's service counters, one entry per copy.

    Attributes (arrays of length n_copies unless noted): arrived, finished, dropped, tokens,
    ttft_violations, tbt_violations, violations, quality_loss; arrivals_per_pool (copies,
    pools); cohort_weight, cohort_ttft_s, cohort_tbt_s (copies, slots): the finishing cohort of
    each slot (weight 0 where none finished).
    """

    def __init__(self, n_copies: int, n_pools: int, n_slots: int) -> None:
        self.n_copies = n_copies
        z = np.zeros
        self.arrived = z(n_copies)
        self.finished = z(n_copies)
        self.dropped = z(n_copies)
        self.tokens = z(n_copies)
        self.ttft_violations = z(n_copies)
        self.tbt_violations = z(n_copies)
        self.violations = z(n_copies)
        self.quality_loss = z(n_copies)
        self.arrivals_per_pool = z((n_copies, n_pools))
        self.cohort_weight = z((n_copies, n_slots))
        self.cohort_ttft_s = z((n_copies, n_slots))
        self.cohort_tbt_s = z((n_copies, n_slots))

    def latency_percentiles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per copy, TTFT P50 and P99 and TBT P50 and P99 of the finishing cohort (0 if none).

        The weighted lower percentile of `serving.weighted_percentiles`, row by row: the first
        sample (in value order) at which the cumulative weight reaches the fraction of the total.
        Zero-weight entries never move the cumulative weight, so they are never the answer.
        """
        w = self.cohort_weight
        n, size = w.shape
        row_start = (np.arange(n) * size)[:, None]
        out = []
        for values in (self.cohort_ttft_s, self.cohort_tbt_s):
            order = values.argsort(axis=1, kind="stable") + row_start
            cum = w.ravel()[order].cumsum(axis=1)
            total = cum[:, -1:]  # as the single model: the cumulative sum's end
            for q in _P50_P99:
                # cum never decreases: the first entry at or above the target.
                pos = np.argmax(cum >= q * total, axis=1)
                picked = values.ravel()[order[np.arange(n), pos]]
                out.append(np.where(total[:, 0] > 0, picked, 0.0))
        return out[0], out[1], out[2], out[3]


class BatchedAggregateServing(AggregateServing):
    """`AggregateServing` over N copies of one cluster (see the module docstring).

    Args:
        n_copies: Copies N.
        slots_per_copy: Instance slots S of one copy.
        pools_per_copy: Request pools P of one copy.
        max_prefill_tokens, drop_after_s: As `AggregateServing`.
    """

    def __init__(self, n_copies: int, slots_per_copy: int, pools_per_copy: int,
                 max_prefill_tokens: int, drop_after_s: float) -> None:
        self.n_copies = n_copies
        self.slot_copy = np.repeat(np.arange(n_copies), slots_per_copy)
        self.pool_copy = np.repeat(np.arange(n_copies), pools_per_copy)
        self.pools_per_copy = pools_per_copy
        super().__init__(n_copies * slots_per_copy, n_copies * pools_per_copy, max_prefill_tokens,
                         drop_after_s, None)

    def _per_copy(self, values: np.ndarray, copy_of: np.ndarray) -> np.ndarray:
        return np.bincount(copy_of, weights=values, minlength=self.n_copies)

    @property
    def in_flight_per_copy(self) -> np.ndarray:
        """Requests arrived and neither finished nor dropped, per copy."""
        return (self._per_copy(self.q, self.slot_copy) + self._per_copy(self.run, self.slot_copy)
                + self._per_copy(self.buf, self.pool_copy))

    def add_interval_arrivals(self, count: np.ndarray, input_tokens: np.ndarray,
                              output_tokens: np.ndarray) -> None:
        """Fold one interval's arrivals into the router buffers: per (copy, pool) count and sums.

        `add_arrivals` per copy: a copy with no arrival leaves its buffers as they are.
        """
        arrived = np.repeat(count.sum(axis=1) > 0, self.pools_per_copy)
        if not arrived.any():
            return
        cnt = count.ravel()
        new = self.buf + cnt
        safe = np.maximum(new, 1e-12)
        self.buf_in = np.where(arrived, (self.buf_in * self.buf + input_tokens.ravel()) / safe,
                               self.buf_in)
        self.buf_out = np.where(arrived, (self.buf_out * self.buf + output_tokens.ravel()) / safe,
                                self.buf_out)
        self.buf_age_s = np.where(arrived, self.buf_age_s * self.buf / safe, self.buf_age_s)
        self.buf = np.where(arrived, new, self.buf)

    def _route(self, dt_s, inst: InstanceTable, serving, route_weight) -> None:
        """`AggregateServing._route`, each copy's router on its own pools and instances."""
        slot_copy, pool_copy = self.slot_copy, self.pool_copy
        weight = np.where(serving, route_weight * inst.max_batch, 0.0)
        has_weight = self._per_copy((weight != 0).astype(float), slot_copy) > 0
        if not has_weight.all():  # a copy whose preferred rows are all empty: weights yield
            fallback = np.where(serving, inst.max_batch, 0).astype(float)
            weight = np.where(has_weight[slot_copy], weight, fallback)
            has_weight = self._per_copy((weight != 0).astype(float), slot_copy) > 0
        pool = inst.pool
        self.slot_pool = pool
        buf = self.buf
        routes = has_weight & (self._per_copy(buf, pool_copy) > 0)
        if not routes.any():
            self.routed = np.zeros(self.n_slots)
            self.rate_rps *= 0.8
            return
        served, share, in_sum, out_sum = self._split_buffers(weight, pool)
        orphan = ~served & (buf > 0) & routes[pool_copy]
        if np.count_nonzero(orphan):
            w_copy = self._per_copy(weight, slot_copy)
            spill = weight / np.where(w_copy > 0, w_copy, 1.0)[slot_copy]
            orphan_n = self._per_copy(np.where(orphan, buf, 0.0), pool_copy)[slot_copy]
            orphan_in = self._per_copy(np.where(orphan, buf * self.buf_in, 0.0), pool_copy)[slot_copy]
            orphan_out = self._per_copy(np.where(orphan, buf * self.buf_out, 0.0),
                                        pool_copy)[slot_copy]
            share = share + orphan_n * spill
            in_sum = in_sum + orphan_in * spill
            out_sum = out_sum + orphan_out * spill
        go = routes[slot_copy]
        share = np.where(go, share, 0.0)
        q = self.q
        tot = q + share
        safe = np.maximum(tot, 1e-12)
        self.q_in = np.where(go, (self.q_in * q + in_sum) / safe, self.q_in)
        self.q_out = np.where(go, (self.q_out * q + out_sum) / safe, self.q_out)
        self.q_age_s = np.where(go, self.q_age_s * q / safe, self.q_age_s)
        self.q = np.where(go, tot, q)
        self.routed = share
        cleared = routes[pool_copy]
        self.buf = np.where(cleared, 0.0, buf)
        self.buf_age_s = np.where(cleared, 0.0, self.buf_age_s)
        self.rate_rps = 0.8 * self.rate_rps + 0.2 * share / dt_s

    def _split_buffers(self, weight: np.ndarray, pool: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each pool's buffer split over its slots in proportion to `weight`.

        Returns (per pool: some slot has weight; per slot: requests, prompt tokens and output
        tokens it receives).
        """
        p_of = np.maximum(pool, 0)
        # Weights are >= 0 and zero off the serving (active) slots, so a slot of an unserved
        # pool or without an instance gets weight 0 / (w_pool or 1) = 0: no mask needed.
        w_pool = np.bincount(p_of, weights=weight, minlength=self.n_pools)
        served = w_pool > 0
        frac = weight / np.where(served, w_pool, 1.0)[p_of]
        share = self.buf[p_of] * frac
        return served, share, share * self.buf_in[p_of], share * self.buf_out[p_of]

    def tick(self, t0_s, dt_s, inst, serving, model, route_weight, slo_ttft_s, slo_tbt_s,
             quality_loss_per_slot, acc):
        """`AggregateServing.tick`; a tick with no work anywhere ages every copy's queues."""
        load = super().tick(t0_s, dt_s, inst, serving, model, route_weight, slo_ttft_s, slo_tbt_s,
                            quality_loss_per_slot, acc)
        if np.isscalar(load.tokens_generated):  # the early return: nothing served anywhere
            load.tokens_generated = np.zeros(self.n_copies)
        return load

    def _count_dropped(self, acc: BatchedAccumulator, excess: np.ndarray, per_slot: bool) -> None:
        acc.dropped += self._per_copy(excess, self.slot_copy if per_slot else self.pool_copy)

    def _tokens_generated(self, dec_tokens: np.ndarray, adm: np.ndarray, idx: np.ndarray):
        copy_of = self.slot_copy[idx]
        return self._per_copy(dec_tokens, copy_of) + self._per_copy(adm, copy_of)

    def _age_idle(self, idx: np.ndarray, dt_s: float) -> None:
        """Copies with no slot in `idx` age every queue, as the single model's early return."""
        worked = np.bincount(self.slot_copy[idx], minlength=self.n_copies) > 0
        if not worked.all():
            self.q_age_s = np.where(worked[self.slot_copy], self.q_age_s, self.q_age_s + dt_s)

    def _record(self, acc: BatchedAccumulator, idx, finished, ttft_miss, tbt_bad, bad, tbt,
                ttft_mid, qloss) -> None:
        copy_of = self.slot_copy[idx]
        acc.finished += self._per_copy(finished, copy_of)
        acc.ttft_violations += self._per_copy(finished * ttft_miss, copy_of)
        acc.tbt_violations += self._per_copy(finished * tbt_bad, copy_of)
        acc.violations += self._per_copy(finished * bad, copy_of)
        acc.quality_loss += self._per_copy(finished * qloss, copy_of)
        # One cohort per interval (the aggregate model ticks once per interval).
        acc.cohort_weight.ravel()[idx] = finished
        acc.cohort_ttft_s.ravel()[idx] = ttft_mid
        acc.cohort_tbt_s.ravel()[idx] = tbt
