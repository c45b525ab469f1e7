"""Aggregate (fluid) serving for fast training: per-instance counts, no per-request state.

Each instance slot keeps the number of waiting and running requests and their mean lengths.
Per tick, arrivals are routed by the same water-filling rule as the request-level model,
admitted under the batch cap and KV memory, prefilled one after another and decoded in
iterations of profile-table length; completions follow Little's law. TTFT of an admitted
cohort is spread uniformly over its sequential prefills, so SLO attainment degrades smoothly
as queues grow, as it does in the request-level model. It shares the power, thermal and
profile models with the request-level model; only the bookkeeping of requests differs.
"""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator, TickLoad


class AggregateServing:
    """Fluid continuous-batching model over the instance table."""

    def __init__(self, n_slots: int, n_pools: int, max_prefill_tokens: int, drop_after_s: float):
        self.n_slots = n_slots
        self.n_pools = n_pools
        self.max_prefill_tokens = max_prefill_tokens
        self.drop_after_s = drop_after_s
        self.reset()

    def reset(self) -> None:
        """Empty every queue."""
        n, p = self.n_slots, self.n_pools
        self.q = np.zeros(n)
        self.q_in = np.zeros(n)
        self.q_out = np.zeros(n)
        self.q_age_s = np.zeros(n)
        self.run = np.zeros(n)
        self.run_ctx = np.zeros(n)
        self.run_out = np.zeros(n)
        self.slot_pool = np.full(n, -1, dtype=np.int64)
        self.busy_until_s = np.zeros(n)
        self.last_iter_s = np.zeros(n)
        self.buf = np.zeros(p)
        self.buf_in = np.zeros(p)
        self.buf_out = np.zeros(p)
        self.buf_age_s = np.zeros(p)
        self.rate_rps = np.zeros(n)

    @property
    def in_flight(self) -> float:
        """Requests arrived and neither finished nor dropped."""
        return float(self.q.sum() + self.run.sum() + self.buf.sum())

    def per_pool_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Waiting and running request counts per pool."""
        has = self.slot_pool >= 0
        sp = np.where(has, self.slot_pool, 0)
        waiting = np.bincount(sp, weights=self.q * has, minlength=self.n_pools) + self.buf
        running = np.bincount(sp, weights=self.run * has, minlength=self.n_pools)
        return waiting, running

    def add_arrivals(self, arrival_s, input_tokens, output_tokens, pool) -> None:
        """Fold new requests into the per-pool router buffer."""
        if len(arrival_s) == 0:
            return
        cnt = np.bincount(pool, minlength=self.n_pools)
        tot_in = np.bincount(pool, weights=input_tokens, minlength=self.n_pools)
        tot_out = np.bincount(pool, weights=output_tokens, minlength=self.n_pools)
        new = self.buf + cnt
        safe = np.maximum(new, 1e-12)
        self.buf_in = (self.buf_in * self.buf + tot_in) / safe
        self.buf_out = (self.buf_out * self.buf + tot_out) / safe
        self.buf_age_s = self.buf_age_s * self.buf / safe  # new arrivals have age 0
        self.buf = new

    def requeue(self, stopped_slots: np.ndarray) -> None:
        """Requests of stopped instances go back to the router buffer (progress lost)."""
        idx = np.flatnonzero(stopped_slots & (self.slot_pool >= 0))
        for i in idx:
            p = self.slot_pool[i]
            n = self.q[i] + self.run[i]
            if n <= 0:
                continue
            inp = (self.q[i] * self.q_in[i] + self.run[i] * np.maximum(
                self.run_ctx[i] - self.run_out[i] / 2, 1.0)) / n
            out = (self.q[i] * self.q_out[i] + self.run[i] * self.run_out[i]) / n
            tot = self.buf[p] + n
            self.buf_in[p] = (self.buf_in[p] * self.buf[p] + inp * n) / tot
            self.buf_out[p] = (self.buf_out[p] * self.buf[p] + out * n) / tot
            self.buf_age_s[p] = (self.buf_age_s[p] * self.buf[p] + self.q_age_s[i] * self.q[i]) / tot
            self.buf[p] = tot
        self.q[stopped_slots] = 0.0
        self.run[stopped_slots] = 0.0
        self.busy_until_s[stopped_slots] = 0.0

    def _route(self, dt_s, inst: InstanceTable, serving, route_weight) -> None:
        """Split each pool's new requests over its live instances in proportion to weight.

        In the fluid model the instances of a pool are interchangeable, so the proportional
        split is what join-shortest-queue converges to; a pool with no live instance spills
        over all live instances, as in the request-level router.
        """
        weight = np.where(serving, route_weight * inst.max_batch, 0.0)
        any_weight = np.count_nonzero(weight) > 0
        if not any_weight:  # every preferred row is empty: routing weights yield
            weight = np.where(serving, inst.max_batch, 0).astype(float)
            any_weight = np.count_nonzero(weight) > 0
        # Only active slots hold an instance, and every active slot has a pool (>= 0).
        pool = inst.pool
        self.slot_pool = pool
        buf = self.buf
        if not any_weight or buf.sum() <= 0:
            self.rate_rps *= 0.8
            return
        p_of = np.maximum(pool, 0)
        # Weights are >= 0 and zero off the serving (active) slots, so a slot of an unserved
        # pool or without an instance gets weight 0 / (w_pool or 1) = 0: no mask needed.
        w_pool = np.bincount(p_of, weights=weight, minlength=self.n_pools)
        served = w_pool > 0
        frac = weight / np.where(served, w_pool, 1.0)[p_of]
        share = buf[p_of] * frac
        in_sum = share * self.buf_in[p_of]
        out_sum = share * self.buf_out[p_of]
        orphan = ~served & (buf > 0)
        if np.count_nonzero(orphan):
            spill = weight / weight.sum()
            n_orphan = buf[orphan].sum()
            share = share + n_orphan * spill
            in_sum = in_sum + (buf * self.buf_in)[orphan].sum() * spill
            out_sum = out_sum + (buf * self.buf_out)[orphan].sum() * spill
        q = self.q
        tot = q + share
        safe = np.maximum(tot, 1e-12)
        self.q_in = (self.q_in * q + in_sum) / safe
        self.q_out = (self.q_out * q + out_sum) / safe
        self.q_age_s = self.q_age_s * q / safe  # new arrivals have age 0
        self.q = tot
        self.buf = np.zeros(self.n_pools)
        self.buf_age_s = np.zeros(self.n_pools)
        self.rate_rps = 0.8 * self.rate_rps + 0.2 * share / dt_s

    def _drop_stale_buffer(self, dt_s: float, acc: ServiceAccumulator) -> None:
        """Age the router buffer held while no instance serves, and drop its oldest requests.

        The buffer is held only while no instance is live at all. Its requests arrived
        about evenly since the oldest one, 2 x their mean age ago: the part older than
        drop_after_s is dropped, and the rest (ages spread over drop_after_s) keeps a mean
        age of half of it. So an unserved request is dropped `drop_after_s` after arrival, as
        in the request-level model, instead of waiting forever.
        """
        held = self.buf > 0
        self.buf_age_s = np.where(held, self.buf_age_s + dt_s, 0.0)
        span = 2.0 * self.buf_age_s
        stale = held & (span > self.drop_after_s)
        if not np.count_nonzero(stale):
            return
        excess = np.where(stale, self.buf * (1.0 - self.drop_after_s / np.maximum(span, 1e-12)),
                          0.0)
        acc.dropped += float(excess.sum())
        self.buf = self.buf - excess
        self.buf_age_s = np.where(stale, 0.5 * self.drop_after_s, self.buf_age_s)

    def _drop_stale(self, acc: ServiceAccumulator) -> None:
        """Drop requests older than drop_after_s, in FIFO order.

        They are the queue beyond what the recent arrival rate could have brought in within
        drop_after_s; nothing is dropped while no queue is that old (the common case).
        """
        stale = self.q_age_s > self.drop_after_s
        if not np.count_nonzero(stale):
            acc.dropped += 0.0
            return
        excess = np.maximum(self.q - self.rate_rps * self.drop_after_s - 1.0, 0.0)
        excess = np.where(stale, excess, 0.0)
        acc.dropped += float(excess.sum())
        self.q -= excess

    def tick(self, t0_s, dt_s, inst: InstanceTable, serving, model, route_weight, slo_ttft_s,
             slo_tbt_s, quality_loss_per_slot, acc: ServiceAccumulator) -> TickLoad:
        """Advance the fluid state by one tick and return how busy each slot was."""
        n = self.n_slots
        t1 = t0_s + dt_s
        load = TickLoad(np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n))
        self._route(dt_s, inst, serving, route_weight)
        if np.count_nonzero(self.buf):  # no live instance took the router's buffer
            self._drop_stale_buffer(dt_s, acc)
        self._drop_stale(acc)
        idx = (serving & ((self.q > 1e-9) | (self.run > 1e-9))).nonzero()[0]
        if len(idx) == 0:
            self.q_age_s += dt_s
            return load
        q, run = self.q[idx], self.run[idx]
        q_in, q_out = self.q_in[idx], self.q_out[idx]
        run_ctx, run_out = self.run_ctx[idx], self.run_out[idx]
        # ---- admission -------------------------------------------------------------------
        kv_free = model.kv_capacity_tokens[idx] - run * (run_ctx + run_out / 2)
        per_req_kv = np.maximum(q_in + q_out, 1.0)
        room = np.maximum(np.minimum(inst.max_batch[idx] - run, kv_free / per_req_kv), 0.0)
        adm = np.minimum(q, np.floor(room + 1e-9))
        adm = np.where((run < 0.5) & (q > 0) & (adm < 1), np.minimum(q, 1.0), adm)
        admitted = adm > 0
        tau = np.where(admitted, model.prefill_time_s(np.maximum(q_in, 1.0), idx), 0.0)
        backlog = np.maximum(self.busy_until_s[idx] - t0_s, 0.0)
        busy_end = t0_s + backlog + adm * tau
        self.busy_until_s[idx] = busy_end
        prefill_end = np.minimum(busy_end, t1)
        load.prefill_busy_s[idx] = prefill_end - t0_s
        load.prefill_tokens[idx] = np.where(admitted, q_in, 0.0)
        # TTFT of the admitted cohort. Arrivals spread over the tick queue for the prefill
        # server like an M/D/1 queue (mean wait rho*tau / 2(1-rho)) plus half a decode
        # iteration (prefill starts at an iteration boundary); requests carried over from an
        # earlier tick add their queue age and the carried prefill backlog.
        age = self.q_age_s[idx]
        rho = adm * tau / dt_s
        # The running batch's iteration time, as of the end of the last tick.
        iter_now = np.where(run > 0, self.last_iter_s[idx], 0.0)
        base = tau + backlog + age
        wait = np.where(rho < 0.95, rho * tau / (2 * np.maximum(1 - rho, 0.05)), 0.0) + iter_now / 2
        overloaded = rho >= 0.95
        any_overloaded = np.count_nonzero(overloaded) > 0
        # An overloaded prefill server works through its cohort one request after another.
        span = (np.where(overloaded, np.maximum(busy_end - t1, 0.0) + 0.5 * dt_s, 0.0)
                if any_overloaded else None)
        # ---- decode ----------------------------------------------------------------------
        new_run = run + adm
        has_run = new_run > 0
        inv_run = np.maximum(new_run, 1e-12)
        ctx = np.where(has_run, (run * run_ctx + adm * q_in) / inv_run, 0.0)
        out = np.where(has_run, (run * run_out + adm * q_out) / inv_run, 0.0)
        window = t1 - prefill_end
        iter_s = model.decode_iter_time_s(np.maximum(new_run, 1.0), np.maximum(ctx, 1.0), idx)
        n_iter = window / np.maximum(iter_s, 1e-9)
        per_req_tokens = np.maximum(out - 1.0, 0.0)
        frac_done = np.where(per_req_tokens > 0,
                             np.minimum(n_iter / np.maximum(per_req_tokens, 1e-9), 1.0), 1.0)
        finished = new_run * frac_done
        tokens = np.minimum(new_run * n_iter, new_run * per_req_tokens)
        load.decode_busy_s[idx] = np.where(has_run, np.minimum(window, per_req_tokens * iter_s), 0.0)
        load.decode_batch[idx] = new_run
        load.tokens_generated = float(tokens.sum() + adm.sum())
        # TBT: per-token interval including the prefill stalls of this tick.
        tbt = iter_s * dt_s / np.maximum(window, iter_s)
        # ---- SLO accounting for the finishing cohort (it carries the TTFT of its admission)
        if finished.sum() > 0:
            pool = inst.pool[idx]  # serving slots always have a pool
            slo_t = slo_ttft_s[pool]
            over = slo_t - base
            ttft_ok = np.where(over > 0, -np.expm1(-(over / np.maximum(wait, 1e-6)).clip(0.0, 50.0)),
                               0.0)
            if any_overloaded:
                ok_seq = (over / np.maximum(span, 1e-9)).clip(0.0, 1.0)
                ttft_ok = np.where(overloaded, ok_seq, ttft_ok)
                ttft_mean = base + np.where(overloaded, span / 2, wait)
            else:
                ttft_mean = base + wait
            self._record(acc, finished, ttft_ok, tbt, ttft_mean, slo_t, slo_tbt_s[pool],
                         quality_loss_per_slot[idx])
        # ---- state update ----------------------------------------------------------------
        left = q - adm
        self.q[idx] = left
        self.q_age_s[idx] = np.where(left > 1e-9, age + dt_s, 0.0)
        rest = self.q > 0  # queues this tick did not serve grow older
        rest[idx] = False
        if np.count_nonzero(rest):
            self.q_age_s[rest] += dt_s
        self.run[idx] = new_run - finished
        running = frac_done < 1
        self.run_ctx[idx] = np.where(running, ctx + n_iter, 0.0)
        self.run_out[idx] = np.where(running, out, 0.0)
        self.last_iter_s[idx] = iter_s
        return load

    def _record(self, acc, finished, ttft_ok, tbt, ttft_mid, slo_ttft, slo_tbt, qloss) -> None:
        """Add the finishing cohort's weighted counts and its latency samples to `acc`."""
        w = finished
        ttft_miss = 1.0 - ttft_ok
        tbt_bad = (tbt > slo_tbt).astype(float)
        # One weighted sum per counter (each row sums exactly as a 1-D sum would).
        per_req = np.array([np.ones_like(w), ttft_miss, tbt_bad, np.maximum(ttft_miss, tbt_bad), qloss])
        n_fin, n_ttft, n_tbt, n_bad, qsum = (w * per_req).sum(axis=1).tolist()
        acc.finished += n_fin
        acc.ttft_violations += n_ttft
        acc.tbt_violations += n_tbt
        acc.violations += n_bad
        acc.quality_loss += qsum
        keep = w > 0
        acc.ttft_s.append(ttft_mid[keep])
        acc.tbt_s.append(tbt[keep])
        acc.weight.append(w[keep])
